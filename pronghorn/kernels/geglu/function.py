"""GeGLU autograd Function with a hand-written backward, and the public ``geglu`` entry point."""
from __future__ import annotations

import functools

import torch

from pronghorn.kernels.backend import use_triton
from pronghorn.kernels.gated import GatedActivationFunction, GatedKernels, check_pair
from pronghorn.kernels.geglu.reference import check_approximate, geglu_reference


class GeGLUFunction(GatedActivationFunction):
    """``h = gelu(g) * u``.

    Backward, given ``dh = dL/dh``: ``dL/du = dh * gelu(g)`` and ``dL/dg = dh * u * gelu'(g)``, with

    * exact (``approximate="none"``): ``gelu(g) = g Phi(g)``, so
      ``gelu'(g) = Phi(g) + g phi(g)``, ``phi(g) = exp(-g^2/2) / sqrt(2 pi)``;
    * tanh form: ``gelu(g) = 0.5 g (1 + t)``, ``t = tanh(k (g + c g^3))``, ``k = sqrt(2/pi)``,
      ``c = 0.044715``, so ``gelu'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 c g^2)``.

    Apply as ``GeGLUFunction.apply(gate, up, geglu_kernels(approximate), inplace_backward)``.
    ``gelu`` is recomputed from the saved ``g``; with ``inplace_backward`` the gradients are written
    over the saved buffers (see :class:`pronghorn.kernels.gated.GatedActivationFunction`).
    """


@functools.cache
def geglu_kernels(approximate: str) -> GatedKernels:
    """The GeGLU Triton kernel pair for ``approximate`` (imports Triton: call only where it can run)."""
    from pronghorn.kernels.geglu.triton import geglu_backward, geglu_forward

    check_approximate(approximate)
    approx_tanh = approximate == "tanh"
    return GatedKernels("geglu", functools.partial(geglu_forward, approx_tanh=approx_tanh),
                        functools.partial(geglu_backward, approx_tanh=approx_tanh))


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *,
          inplace_backward: bool = False) -> torch.Tensor:
    """GeGLU gate of a gated MLP: ``gelu(gate) * up``, fused in one kernel each way.

    Args:
        gate: output of the gate projection, any shape ``[..., I]``.
        up: output of the up projection, same shape and dtype as ``gate``.
        approximate: ``"tanh"`` (Hugging Face ``gelu_pytorch_tanh`` / ``gelu_new``, Gemma) or
            ``"none"`` (exact erf GELU, Hugging Face ``gelu``), as in ``torch.nn.functional.gelu``.
        inplace_backward: write the gradients over ``gate``/``up`` in backward; safe only when
            no other autograd node saved them (true for fresh ``nn.Linear`` outputs).

    Uses the Triton kernels where :func:`pronghorn.kernels.backend.use_triton` allows, else the
    PyTorch reference.
    """
    check_approximate(approximate)
    check_pair(gate, up, "geglu")
    if use_triton(gate, up) and gate.numel() > 0:
        return GeGLUFunction.apply(gate, up, geglu_kernels(approximate), inplace_backward)
    return geglu_reference(gate, up, approximate)
