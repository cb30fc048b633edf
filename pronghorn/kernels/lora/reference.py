"""Plain PyTorch LoRA projections with autograd backward: what the fused Functions must reproduce.

Same math as PEFT's eager ``base(x) + lora_B(lora_A(x)) * scaling`` with dropout 0, in one compute dtype.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..dequant.weights import dense_weight
from .parts import as_parts
from .projection import compute_dtype


def lora_linear_reference(x, W, A=None, B=None, scale=1.0, bias=None):
    """``x W^T + bias + scale * (x A^T) B^T`` with autograd (W dequantized if it is a bnb weight)."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    y = F.linear(x, dense_weight(W, dtype).detach(), None if bias is None else bias.to(dtype))
    if A is not None:
        y = y + F.linear(F.linear(x, A.to(dtype)), B.to(dtype)) * scale
    return y


def _proj(x, p):
    p = as_parts(p)
    return lora_linear_reference(x, p.weight, p.A, p.B, p.scale, p.bias)


def gated_reference(g, u, activation):
    """``act(g) * u`` with the activation computed in float32 and rounded once."""
    if activation == "swiglu":
        a = F.silu(g.float())
    else:
        a = F.gelu(g.float(), approximate="tanh" if activation == "geglu_tanh" else "none")
    return (a * u.float()).to(g.dtype)


def lora_mlp_reference(x, gate, up, down, activation="swiglu", *, fused_gate_up=False):
    """Reference for :func:`pronghorn.kernels.lora.lora_mlp`."""
    if fused_gate_up:
        g, u = _proj(x, gate).chunk(2, dim=-1)
    else:
        g, u = _proj(x, gate), _proj(x, up)
    return _proj(gated_reference(g, u, activation), down)


def lora_qkv_reference(x, q, k, v):
    """Reference for :func:`pronghorn.kernels.lora.lora_qkv`."""
    return _proj(x, q), _proj(x, k), _proj(x, v)
