"""Gated activations for the fused LoRA MLP: ``h = act(g) * u`` and its gradients, on 2-D row views.

``g``/``u`` may come with the gate/up LoRA terms still factored (:class:`LowRank`, ``s xa B^T``); the
kernels of :mod:`pronghorn.kernels.lora_gated` then add them tile by tile, so the full-size corrected
``g``/``u`` are never written. Without LoRA terms the SwiGLU/GeGLU kernels run (pronghorn.kernels.swiglu
/ .geglu). Forward writes ``h``; backward writes ``dg``/``du`` over ``g``/``u``. Without Triton the same
math runs in PyTorch (float32, rounded once), so the fused MLP works everywhere.
"""
from __future__ import annotations

import torch

from ..backend import use_triton
from ..geglu.reference import geglu_reference
from ..lora_gated.reference import LowRank, lora_gated_backward_reference, lora_gated_reference
from ..swiglu.reference import swiglu_reference

ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu_exact")

NO_LOW_RANK = (None, None)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (silu for Llama/Qwen/Mistral/Phi-3, "
                         f"gelu_pytorch_tanh for Gemma, exact gelu), got {activation!r}")


def _has_low(low) -> bool:
    return any(side is not None for side in low)


def _low_tensors(low) -> list:
    return [t for side in low if side is not None for t in (side.xa, side.B)]


def gated_forward(g: torch.Tensor, u: torch.Tensor, activation: str,
                  low: tuple[LowRank | None, LowRank | None] = NO_LOW_RANK) -> torch.Tensor:
    """``act(g + low[0]) * (u + low[1])`` for 2-D ``g``/``u`` (unit column stride; row stride free), a new
    contiguous tensor; ``low`` holds the gate's and the up's factored LoRA terms (None where absent)."""
    has_low = _has_low(low)
    if use_triton(g, u, *_low_tensors(low)) and g.numel() > 0:
        if has_low:
            from ..lora_gated.triton import lora_gated_forward

            return lora_gated_forward(g, u, *low, activation)
        if activation == "swiglu":
            from ..swiglu.triton import swiglu_forward

            return swiglu_forward(g, u)
        from ..geglu.triton import geglu_forward

        return geglu_forward(g, u, activation == "geglu_tanh")
    if has_low:
        return lora_gated_reference(g, u, *low, activation)
    if activation == "swiglu":
        return swiglu_reference(g, u)
    return geglu_reference(g, u, "tanh" if activation == "geglu_tanh" else "none")


def gated_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str,
                    low: tuple[LowRank | None, LowRank | None] = NO_LOW_RANK,
                    low_dh: LowRank | None = None, want_h: bool = False, h_out: torch.Tensor | None = None):
    """``(dL/dg, dL/du, h)`` for ``h = act(g + low[0]) * (u + low[1])`` and upstream gradient ``dh + low_dh``
    (``low_dh``: the down projection's LoRA share, kept factored). The gradients are written over ``g`` and
    ``u`` (which are returned); they are also the gradients of the LoRA terms' outputs. ``h`` is the
    forward's output, made in the same pass when ``want_h`` (else None), into ``h_out`` when given (which may
    be ``dh`` itself: each element of ``dh`` is read before its ``h`` is written).

    The caller must own ``g``/``u`` (no other autograd node saved them): they are destroyed; ``dh`` is only read
    (unless it is ``h_out``).
    """
    want_h = want_h or h_out is not None
    if use_triton(dh, g, u, *_low_tensors((*low, low_dh))) and g.numel() > 0:
        h = h_out if h_out is not None else torch.empty(g.shape, dtype=g.dtype, device=g.device) if want_h else None
        if _has_low((*low, low_dh)) or want_h:
            from ..lora_gated.triton import lora_gated_backward

            lora_gated_backward(dh, g, u, g, u, *low, activation, low_dh=low_dh, h=h)
        elif activation == "swiglu":
            from ..swiglu.triton import swiglu_backward

            swiglu_backward(dh, g, u, g, u)
        else:
            from ..geglu.triton import geglu_backward

            geglu_backward(dh, g, u, g, u, activation == "geglu_tanh")
        return g, u, h
    h = lora_gated_reference(g, u, *low, activation) if want_h else None
    dg, du = lora_gated_backward_reference(dh, g, u, *low, activation, low_dh)
    g.copy_(dg)
    u.copy_(du)
    if h_out is not None:
        h = h_out.copy_(h)
    return g, u, h
