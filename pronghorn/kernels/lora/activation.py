"""Gated activations for the fused LoRA MLP: ``h = act(g) * u`` and its gradients, on 2-D row views.

The Triton kernels are the SwiGLU/GeGLU ones (pronghorn.kernels.swiglu / .geglu): their forward writes
``h`` and their backward writes ``dg``/``du``, optionally over ``g``/``u`` themselves. Without Triton
the same math runs in PyTorch below (float32, rounded once), so the fused MLP works everywhere.
"""
from __future__ import annotations

import math

import torch

from ..backend import use_triton
from ..geglu.reference import geglu_reference
from ..swiglu.reference import swiglu_reference

ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu_exact")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (silu for Llama/Qwen/Mistral/Phi-3, "
                         f"gelu_pytorch_tanh for Gemma, exact gelu), got {activation!r}")


def _act_and_grad_fp32(g: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(g)`` and ``act'(g)`` in float32 (derivations in SwiGLUFunction / GeGLUFunction)."""
    g = g.float()
    if activation == "swiglu":
        s = torch.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    if activation == "geglu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (g + _KAPPA * g * g * g))
        grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _KAPPA * g * g)
        return 0.5 * g * (1.0 + t), grad
    cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
    return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))


def gated_forward(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(g) * u`` for 2-D ``g``/``u`` (unit column stride; row stride free), a new contiguous tensor."""
    if use_triton(g, u) and g.numel() > 0:
        if activation == "swiglu":
            from ..swiglu.triton import swiglu_forward

            return swiglu_forward(g, u)
        from ..geglu.triton import geglu_forward

        return geglu_forward(g, u, activation == "geglu_tanh")
    if activation == "swiglu":
        return swiglu_reference(g, u)
    return geglu_reference(g, u, "tanh" if activation == "geglu_tanh" else "none")


def gated_backward_(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                    activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dg, dL/du)`` for ``h = act(g) * u``, written over ``g`` and ``u`` (which are returned).

    The caller must own ``g``/``u`` (no other autograd node saved them): they are destroyed.
    """
    if use_triton(dh, g, u) and g.numel() > 0:
        if activation == "swiglu":
            from ..swiglu.triton import swiglu_backward

            swiglu_backward(dh, g, u, g, u)
        else:
            from ..geglu.triton import geglu_backward

            geglu_backward(dh, g, u, g, u, activation == "geglu_tanh")
        return g, u
    act, grad = _act_and_grad_fp32(g, activation)
    dh32 = dh.float()
    dg = dh32 * u.float() * grad
    g.copy_(dg)
    u.copy_(dh32 * act)
    return g, u
