"""GeGLU autograd Function with a hand-written backward, and the public ``geglu`` entry point."""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import use_triton
from pronghorn.kernels.geglu.reference import check_approximate, geglu_reference
from pronghorn.kernels.swiglu.function import as_rows, can_overwrite, check_pair


class GeGLUFunction(torch.autograd.Function):
    """``h = gelu(g) * u``.

    Backward, given ``dh = dL/dh``: ``dL/du = dh * gelu(g)`` and ``dL/dg = dh * u * gelu'(g)``, with

    * exact (``approximate="none"``): ``gelu(g) = g Phi(g)``, so
      ``gelu'(g) = Phi(g) + g phi(g)``, ``phi(g) = exp(-g^2/2) / sqrt(2 pi)``;
    * tanh form: ``gelu(g) = 0.5 g (1 + t)``, ``t = tanh(k (g + c g^3))``, ``k = sqrt(2/pi)``,
      ``c = 0.044715``, so ``gelu'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 c g^2)``.

    ``gelu`` is recomputed from the saved ``g``. With ``inplace_backward`` the gradients are written
    over the saved ``g``/``u`` buffers, and the graph can be walked backward only once.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, approximate: str, inplace_backward: bool):
        from pronghorn.kernels.geglu.triton import geglu_forward

        ctx.approx_tanh = approximate == "tanh"
        h = geglu_forward(as_rows(gate), as_rows(up), ctx.approx_tanh).view(gate.shape)
        ctx.save_for_backward(gate, up)
        ctx.inplace = bool(inplace_backward) and can_overwrite(gate, up)
        ctx.done = False
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        from pronghorn.kernels.geglu.triton import geglu_backward

        if ctx.inplace and ctx.done:
            raise RuntimeError("geglu(inplace_backward=True) wrote its gradients over its saved inputs, so it "
                               "cannot run backward twice; call it with inplace_backward=False to keep the graph")
        ctx.done = True
        gate, up = ctx.saved_tensors
        g2, u2 = as_rows(gate), as_rows(up)
        if ctx.inplace:
            geglu_backward(as_rows(dh), g2, u2, g2, u2, ctx.approx_tanh)
            dgate, dup = gate, up
        else:
            dg = torch.empty_like(g2, memory_format=torch.contiguous_format)
            du = torch.empty_like(u2, memory_format=torch.contiguous_format)
            geglu_backward(as_rows(dh), g2, u2, dg, du, ctx.approx_tanh)
            dgate, dup = dg.view(gate.shape), du.view(up.shape)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None), None, None


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
        return GeGLUFunction.apply(gate, up, approximate, inplace_backward)
    return geglu_reference(gate, up, approximate)
