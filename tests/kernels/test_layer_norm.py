"""LayerNorm kernel parity: Triton (interpreter on CPU) against the PyTorch reference and nn.LayerNorm."""
import pytest
import torch

import pronghorn.kernels.layer_norm.function as ln_fn
from pronghorn.kernels import norm_rows
from pronghorn.kernels.layer_norm import layer_norm
from pronghorn.kernels.layer_norm.reference import layer_norm_reference
from pronghorn.nn.norms import layer_norm_forward
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AFFINE = [(True, True), (True, False), (False, False)]


def _run(fn, x, w, b, g):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, wanted, g)


def _check(x, w, b, eps=1e-5, scale=1.0):
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    y, grads = _run(lambda a, c, d: layer_norm(a, c, d, eps), x, w, b, g)
    yr, grads_r = _run(lambda a, c, d: layer_norm_reference(a, c, d, eps), x, w, b, g)
    assert y.dtype == yr.dtype == x.dtype
    assert_close(y, yr, msg="forward")
    for name, got, want in zip(("dx", "dw", "db"), grads, grads_r):
        assert_close(got, want, scale=scale, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE, ids=["weight-bias", "weight-only", "no-affine"])
@pytest.mark.parametrize("hidden", [3, 127])
def test_matches_reference(dtype, affine, hidden):
    torch.manual_seed(hidden)
    x = torch.randn(2, 5, hidden, dtype=dtype)
    w = torch.randn(hidden, dtype=dtype) if affine[0] else None
    b = torch.randn(hidden, dtype=dtype) if affine[1] else None
    # Low-precision reference rounds intermediate products to the dtype; ours keeps fp32.
    _check(x, w, b, scale=1.0 if dtype == torch.float32 else 2.0)


def test_hidden_one_is_bias_only():
    # With one feature, x - mean is exactly 0: the output is the bias and dx is 0. The reference's
    # own dx/dw there are rounding noise of a 0/0-like expression (~1e-5), so check the exact values.
    x = torch.randn(7, 1, requires_grad=True)
    w = torch.randn(1, requires_grad=True)
    b = torch.randn(1, requires_grad=True)
    y = layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(y, b.detach().expand(7, 1))
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.ones(7, 1))
    assert torch.all(dx == 0) and torch.all(dw == 0)
    torch.testing.assert_close(db, torch.tensor([7.0]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 4, 40).transpose(0, 1),
        lambda: torch.randn(4, 6, 80)[..., 5:45],
        lambda: torch.randn(4, 40, 6).transpose(1, 2),
    ],
    ids=["transposed-rows", "sliced-cols", "strided-last-dim"],
)
def test_non_contiguous_input(make):
    torch.manual_seed(0)
    x = make()
    assert not x.is_contiguous()
    _check(x, torch.randn(40), torch.randn(40))


def test_in_place_backward_reuses_gradient_buffer():
    torch.manual_seed(1)
    x = torch.randn(4, 24, requires_grad=True)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    g = torch.randn(4, 24)
    expected = torch.autograd.grad(layer_norm_reference(x, w, b), (x, w, b), g.clone())
    got = torch.autograd.grad(layer_norm(x, w, b, in_place_backward=True), (x, w, b), g)
    assert got[0].data_ptr() == g.data_ptr()
    for a, e in zip(got, expected):
        assert_close(a, e)


def test_int64_specialisation_matches(monkeypatch):
    monkeypatch.setattr(norm_rows, "offsets_need_int64", lambda *t: True)
    torch.manual_seed(2)
    _check(torch.randn(5, 33), torch.randn(33), torch.randn(33))


def test_reference_fallback_when_triton_unavailable(monkeypatch):
    monkeypatch.setattr(ln_fn, "use_triton", lambda *t: False)

    def fail(*args):
        raise AssertionError("the Triton path ran although use_triton is False")

    monkeypatch.setattr(ln_fn.LayerNormFunction, "apply", fail)
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_reference(x, w, b))


@pytest.mark.parametrize("bias", [True, False])
def test_nn_wrapper_matches_torch_layer_norm(bias):
    torch.manual_seed(3)
    module = torch.nn.LayerNorm(24, eps=1e-6, bias=bias)
    with torch.no_grad():
        module.weight.copy_(torch.randn(24))
        if bias:
            module.bias.copy_(torch.randn(24))
    x = torch.randn(2, 3, 24, requires_grad=True)
    g = torch.randn(2, 3, 24)
    params = [p for p in (module.weight, module.bias) if p is not None]
    expected = module(x)
    grads_ref = torch.autograd.grad(expected, [x, *params], g)
    got = layer_norm_forward(module, x)
    grads = torch.autograd.grad(got, [x, *params], g)
    assert_close(got, expected)
    for a, e in zip(grads, grads_ref):
        assert_close(a, e)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 1024, 4096), (3, 77, 5120), (2048, 8192)])
def test_gpu_large_shapes(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device="cuda")
    w = torch.randn(shape[-1], dtype=dtype, device="cuda")
    b = torch.randn(shape[-1], dtype=dtype, device="cuda")
    # dw/db sum thousands of rows, in another order and (fp16/bf16) without per-product rounding.
    _check(x, w, b, scale=10.0 if dtype == torch.float32 else 4.0)
