"""SwiGLU autograd Function with a hand-written backward, and the public ``swiglu`` entry point."""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import use_triton
from pronghorn.kernels.gated import GatedActivationFunction, GatedKernels, check_pair
from pronghorn.kernels.swiglu.reference import swiglu_reference


class SwiGLUFunction(GatedActivationFunction):
    """``h = silu(g) * u`` with ``silu(g) = g * s``, ``s = sigmoid(g)``.

    Backward, given ``dh = dL/dh``:

    * ``dL/du = dh * silu(g) = dh * g * s``
    * ``dL/dg = dh * u * d silu/dg``, and since ``ds/dg = s (1 - s)``,
      ``d silu/dg = s + g s (1 - s) = s (1 + g (1 - s))``.

    Apply as ``SwiGLUFunction.apply(gate, up, swiglu_kernels(), inplace_backward)``. Only ``g`` and
    ``u`` are saved and ``s`` is recomputed; with ``inplace_backward`` the gradients are written over
    the saved buffers (see :class:`pronghorn.kernels.gated.GatedActivationFunction`).
    """


def swiglu_kernels() -> GatedKernels:
    """The SwiGLU Triton kernel pair (imports Triton: call only where it can run)."""
    from pronghorn.kernels.swiglu.triton import swiglu_backward, swiglu_forward

    return GatedKernels("swiglu", swiglu_forward, swiglu_backward)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, inplace_backward: bool = False) -> torch.Tensor:
    """SwiGLU gate of a gated MLP: ``silu(gate) * up``, fused in one kernel each way.

    Args:
        gate: output of the gate projection, any shape ``[..., I]``.
        up: output of the up projection, same shape and dtype as ``gate``.
        inplace_backward: write the gradients over ``gate``/``up`` in backward instead of
            allocating new buffers. Safe only when no other autograd node saved these tensors
            (true for fresh ``nn.Linear`` outputs); leaves and overlapping inputs are never
            overwritten whatever this says.

    Uses the Triton kernels where :func:`pronghorn.kernels.backend.use_triton` allows, else the
    PyTorch reference (same math, autograd backward).
    """
    check_pair(gate, up, "swiglu")
    if use_triton(gate, up) and gate.numel() > 0:
        return SwiGLUFunction.apply(gate, up, swiglu_kernels(), inplace_backward)
    return swiglu_reference(gate, up)
