"""Plain PyTorch math of the LoRA-corrected gated activation, which the Triton kernels must reproduce."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715


class LowRank(NamedTuple):
    """A LoRA projection's contribution ``scale * xa @ B^T`` kept factored: ``xa`` [N, r], ``B`` [cols, r]."""

    xa: torch.Tensor
    B: torch.Tensor
    scale: float

    def dense(self) -> torch.Tensor:
        return self.scale * (self.xa.float() @ self.B.float().t())


def act_and_grad_fp32(g: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(g)`` and ``act'(g)`` in float32 for "swiglu" (SiLU), "geglu_tanh" and "geglu_exact"."""
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


def corrected(t: torch.Tensor, low: LowRank | None) -> torch.Tensor:
    """``t + low`` in float32 (``t`` alone when there is no LoRA term)."""
    return t.float() if low is None else t.float() + low.dense()


def lora_gated_reference(g, u, low_g: LowRank | None, low_u: LowRank | None, activation: str) -> torch.Tensor:
    """``act(g + low_g) * (u + low_u)`` in float32, rounded once to ``g``'s dtype."""
    act, _ = act_and_grad_fp32(corrected(g, low_g), activation)
    return (act * corrected(u, low_u)).to(g.dtype)


def lora_gated_backward_reference(dh, g, u, low_g: LowRank | None, low_u: LowRank | None,
                                  activation: str, low_dh: LowRank | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dg, dL/du)`` (equal to the gradients of the corrected gate/up) for upstream ``dh + low_dh``,
    float32 math, rounded once."""
    act, grad = act_and_grad_fp32(corrected(g, low_g), activation)
    dh32 = corrected(dh, low_dh)
    return (dh32 * corrected(u, low_u) * grad).to(g.dtype), (dh32 * act).to(u.dtype)
