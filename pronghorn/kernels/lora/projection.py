"""Forward and backward of LoRA projections that share one input; the building block of every fused path.

For one projection ``y = x W^T + b + s (x A^T) B^T`` with frozen ``W``/``b`` and upstream ``dy``:

* ``dx = dy W + s (dy B) A``
* ``dA = s (dy B)^T x``
* ``dB = s dy^T (x A^T)``

so backward needs ``x`` (only if ``A`` trains), the small ``x A^T`` ``[N, r]`` (only if ``B`` trains), and
``W``, which is re-materialised (dequantized for 4-bit bases) rather than saved. Projections sharing one
input (q/k/v, gate/up) save that input once and run their ``A``s as one concatenated GEMM each way. The
scale is applied to the small ``[N, r]`` factors so no full-size scaled copy exists. All matmuls run in
one compute dtype: the autocast dtype when autocast is on, otherwise ``x.dtype``; gradients come back in
each input's own dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dequant.weights import dense_weight
from . import cast_cache
from .parts import LoraParts

PER_PROJ = 4  # weight, A, B, bias in the flat argument list of the autograd Functions


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def flat_parts(parts: list[LoraParts]) -> list:
    out = []
    for p in parts:
        out += [p.weight, p.A, p.B, p.bias]
    return out


def unflat_parts(flat, scales) -> list[LoraParts]:
    return [LoraParts(flat[i], flat[i + 1], flat[i + 2], scales[i // PER_PROJ], flat[i + 3])
            for i in range(0, len(flat), PER_PROJ)]


def cast_to(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


def lora_inputs(x2: torch.Tensor, parts: list[LoraParts], dtype) -> list:
    """Each projection's ``x A^T`` [N, r] for projections sharing input ``x2`` (None without LoRA), in one GEMM."""
    lora = [p for p in parts if p.A is not None]
    if not lora:
        return [None] * len(parts)
    a_cat = cast_cache.cat_rows([p.A for p in lora], dtype)
    xas_iter = iter((x2 @ a_cat.t()).split([p.A.shape[0] for p in lora], dim=1))
    return [next(xas_iter) if p.A is not None else None for p in parts]


def unread_output(like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The output of a backward recompute that nobody reads: zeros of ``shape`` as one expanded scalar, so no
    memory is written, yet whatever does read it gets a defined value."""
    return like.new_zeros((), dtype=dtype).expand(shape)


def forward_shared(x2: torch.Tensor, parts: list[LoraParts], dtype) -> tuple[list, list]:
    """Outputs of projections sharing input ``x2`` [N, in], and each one's ``x A^T`` (None without LoRA)."""
    xas = lora_inputs(x2, parts, dtype)
    return project(x2, parts, xas, dtype), xas


def project(x2: torch.Tensor, parts: list[LoraParts], xas: list, dtype, into=None) -> list:
    """Each projection's output ``x W^T + b + s (x A^T) B^T`` from its ``x A^T`` (see :func:`lora_inputs`).
    ``into``: per projection, None or a function ``(shape, dtype, device) -> tensor or None``: the buffer to write
    it in."""
    outs = []
    for p, xa, out in zip(parts, xas, into or [None] * len(parts)):
        w = dense_weight(p.weight, dtype)
        buffer = out((x2.shape[0], w.shape[0]), dtype, x2.device) if out is not None else None
        if buffer is None:
            y = F.linear(x2, w, cast_to(p.bias, dtype))
        else:
            y = torch.mm(x2, w.t(), out=buffer)
            if p.bias is not None:
                y.add_(cast_to(p.bias, dtype))
        del w  # a dequantized weight is freed here, before the next projection materialises its own
        if xa is not None:
            y.addmm_(xa, cast_cache.cast(p.B, dtype).t(), alpha=p.scale)
        outs.append(y)
    return outs


def backward_shared(x2, xas, parts, dys, dtype, need_dx, need_a, need_b):
    """``(dx, [dA], [dB])`` for projections sharing ``x2``; ``x2`` is used only for dA and may be None
    then. dA is done before dx so a recomputed ``x2`` can be freed by the caller before dx allocates.
    dA and dB come back in their parameters' dtypes (see :func:`grad_mm`)."""
    d_as, d_bs, ts = factor_grads(x2, xas, parts, dys, dtype, need_dx, need_a, need_b)
    return (input_grad(parts, dys, ts, dtype) if need_dx else None), d_as, d_bs


def factor_grads(x2, xas, parts, dys, dtype, need_t, need_a, need_b, ts=None):
    """``([dA], [dB], ts)`` for projections sharing ``x2``: ``ts`` maps each LoRA projection's index to its
    ``t = s dy B`` [N, r], made where ``need_t`` (the caller's input gradient needs it) or its dA does,
    unless the caller passes it in ``ts`` from an earlier call."""
    d_as, d_bs = [None] * len(parts), [None] * len(parts)
    ts = dict(ts or {})
    for i, p in enumerate(parts):
        if p.A is None:
            continue
        if need_b[i]:
            d_bs[i] = grad_mm(dys[i].t(), _scaled(xas[i], p.scale), p.B.dtype)
        if (need_t or need_a[i]) and i not in ts:
            ts[i] = _scaled(dys[i] @ cast_cache.cast(p.B, dtype), p.scale)
    order = list(ts)
    wants_a = [i for i in order if need_a[i]]
    if len(wants_a) > 1 and wants_a == order and len({parts[i].A.dtype for i in order}) == 1:
        # Every adapter of this input trains: one GEMM for all their dA, split by rank.
        d_cat = grad_mm(_cat_factors(ts, order).t(), x2, parts[order[0]].A.dtype)
        for i, d in zip(order, d_cat.split([parts[i].A.shape[0] for i in order])):
            d_as[i] = d
    else:
        for i in wants_a:
            d_as[i] = grad_mm(ts[i].t(), x2, parts[i].A.dtype)
    return d_as, d_bs, ts


def input_grad(parts, dys, ts, dtype) -> torch.Tensor:
    """``dx = sum_i dy_i W_i + t_i A_i`` with ``ts`` from :func:`factor_grads` (empty: base terms only).

    The low-rank part is written first and the base GEMMs accumulate onto it (cuBLAS ``beta=1``): one trip
    of ``dx`` through memory fewer than adding it afterwards, and faster for the input gradients of
    q/k/v and o_proj on the H100 (``benchmarks/kernels/bench_lora_epilogue.py``).
    """
    order = list(ts)
    dx = _cat_factors(ts, order) @ cast_cache.cat_rows([parts[i].A for i in order], dtype) if order else None
    for p, dy in zip(parts, dys):
        w = dense_weight(p.weight, dtype)
        dx = dy @ w if dx is None else dx.addmm_(dy, w)
        del w
    return dx


def _cat_factors(ts: dict, order: list) -> torch.Tensor:
    return torch.cat([ts[i] for i in order], dim=1) if len(order) > 1 else ts[order[0]]


def grad_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype``, a LoRA parameter's dtype. On CUDA a float32 result for 16-bit operands comes
    straight out of the GEMM (``out_dtype``, fp32 accumulation kept) instead of a 16-bit product plus a cast:
    one launch and one rounding fewer per factor per step."""
    if a.dtype == dtype:
        return a @ b
    if wide_result(a, dtype):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def wide_result(a: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether cuBLAS writes ``a @ b`` straight into ``out_dtype`` (float32 from 16-bit operands, on CUDA)."""
    return a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)


def _scaled(t, scale):
    # lora_alpha == r (scale 1) is common; skipping the multiply saves a kernel per projection per pass.
    return t if scale == 1.0 else t * scale


def grads_out(parts, d_as, d_bs):
    out = []
    for p, da, db in zip(parts, d_as, d_bs):
        out += [None, cast_to(da, p.A.dtype) if da is not None else None,
                cast_to(db, p.B.dtype) if db is not None else None, None]
    return out
