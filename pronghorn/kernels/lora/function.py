"""Fused LoRA linear (o_proj and friends) and shared-input q/k/v, with hand-written backward.

The math is in :mod:`.projection`; the gated MLP is in :mod:`.mlp`.
"""
from __future__ import annotations

import torch

from ..dequant.weights import weight_rows
from .parts import LoraParts, as_parts
from .projection import (
    PER_PROJ, backward_shared, cast_to, compute_dtype, flat_parts, forward_shared, grads_out, lora_inputs,
    unflat_parts, unread_output,
)


class LoraSharedInputFunction(torch.autograd.Function):
    """Any number of LoRA projections of one input (o_proj alone; q, k, v together). See module docstring.

    ``output_unused``: a backward recompute that reads no output value (see :mod:`pronghorn.memory.recompute`);
    only ``x A^T`` is computed, and the outputs are zeros that take no memory.
    """

    @staticmethod
    def forward(ctx, x, scales, output_unused, *flat):
        parts = unflat_parts(flat, scales)
        dtype = compute_dtype(x)
        x2 = cast_to(x.reshape(-1, x.shape[-1]), dtype)
        if output_unused:
            xas = lora_inputs(x2, parts, dtype)
            outs = [unread_output(x2, (x2.shape[0], weight_rows(p.weight)), dtype) for p in parts]
        else:
            outs, xas = forward_shared(x2, parts, dtype)
        needs = ctx.needs_input_grad[3:]
        need_a = [needs[i * PER_PROJ + 1] for i in range(len(parts))]
        need_b = [needs[i * PER_PROJ + 2] for i in range(len(parts))]
        ctx.dtype, ctx.x_dtype, ctx.scales, ctx.n = dtype, x.dtype, scales, len(parts)
        ctx.need_a, ctx.need_b = need_a, need_b
        ctx.weights = [p.weight for p in parts]  # frozen handles, not copies (dequantized again in backward)
        saved = [x2 if any(need_a) else None]
        saved += [xa if nb else None for xa, nb in zip(xas, need_b)]
        saved += [t for p in parts for t in (p.A, p.B)]
        ctx.save_for_backward(*saved)
        lead = x.shape[:-1]
        return tuple(y.view(*lead, y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *dys):
        saved = ctx.saved_tensors
        n, dtype = ctx.n, ctx.dtype
        x2, xas, ab = saved[0], saved[1:1 + n], saved[1 + n:]
        parts = [LoraParts(ctx.weights[i], ab[2 * i], ab[2 * i + 1], ctx.scales[i]) for i in range(n)]
        dys2 = [cast_to(dy.reshape(-1, dy.shape[-1]), dtype) for dy in dys]
        dx, d_as, d_bs = backward_shared(x2, xas, parts, dys2, dtype, ctx.needs_input_grad[0], ctx.need_a, ctx.need_b)
        if dx is not None:
            dx = cast_to(dx, ctx.x_dtype).view(*dys[0].shape[:-1], dx.shape[-1])
        return (dx, None, None, *grads_out(parts, d_as, d_bs))


def _apply_shared(x, parts, output_unused=False):
    parts = [as_parts(p) for p in parts]
    for p in parts:
        if p.A is not None and p.A.shape[1] != x.shape[-1]:
            raise ValueError(f"LoRA A is {tuple(p.A.shape)} but the input has {x.shape[-1]} features")
    return LoraSharedInputFunction.apply(x, tuple(float(p.scale) for p in parts), bool(output_unused),
                                         *flat_parts(parts))


def lora_linear(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor | None = None, B: torch.Tensor | None = None,
                scale: float = 1.0, bias: torch.Tensor | None = None, *, output_unused: bool = False) -> torch.Tensor:
    """``x W^T + bias + scale * (x A^T) B^T`` with a hand-written backward (dX, dA, dB only).

    Args:
        x: input ``[..., in]``, any strides.
        W: frozen base weight ``[out, in]``: a float tensor or a bitsandbytes Params4bit/Int8Params
            (dequantized on the fly in forward and again in backward).
        A: LoRA ``[r, in]`` or None; B: LoRA ``[out, r]`` or None. None/None is a plain frozen linear.
        scale: LoRA scaling (``lora_alpha / r``).
        bias: frozen bias ``[out]`` or None.
        output_unused: the caller only backpropagates through the result (a backward recompute); the base
            GEMM is skipped and zeros are returned (see :class:`LoraSharedInputFunction`).
    """
    return _apply_shared(x, [LoraParts(W, A, B, scale, bias)], output_unused)[0]


def lora_o(x: torch.Tensor, o, output_unused: bool = False) -> torch.Tensor:
    """The attention output projection: :func:`lora_linear` with ``o`` given as LoraParts (or a tuple).

    ``output_unused``: the caller only backpropagates through the result (a backward recompute); the base
    GEMM is skipped and zeros are returned (see :class:`LoraSharedInputFunction`).
    """
    return _apply_shared(x, [o], output_unused)[0]


def lora_qkv(x: torch.Tensor, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, K, V)`` of three LoRA projections of one input, saving ``x`` once.

    Args:
        x: hidden states ``[..., hidden]``.
        q, k, v: LoraParts (weight, A, B, scale, bias) of q_proj, k_proj, v_proj; A/B may be None.
    """
    return _apply_shared(x, [q, k, v])


def lora_qkv_fused(x: torch.Tensor, qkv, sizes: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Phi-3's fused ``qkv_proj``: one LoRA projection whose output is split into ``sizes`` (q, k, v widths)."""
    y = _apply_shared(x, [qkv])[0]
    if sum(sizes) != y.shape[-1]:
        raise ValueError(f"qkv sizes {tuple(sizes)} add up to {sum(sizes)}, but qkv_proj outputs {y.shape[-1]}")
    return y.split(list(sizes), dim=-1)

