"""One table of numerical tolerances for parity tests, keyed by dtype.

A test that needs a looser bound multiplies these and says why in a comment beside it.
"""
import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """assert_close with the table's tolerance for ``dtype`` (default: ``expected.dtype``), times ``scale``."""
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, atol=tol["atol"] * scale, rtol=tol["rtol"] * scale, msg=msg or None
    )
