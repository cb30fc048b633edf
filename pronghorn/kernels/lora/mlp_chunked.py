"""Backward of a recomputed 4-bit LoRA MLP in chunks of the intermediate dimension, each weight dequantized once.

A checkpointed layer's recompute runs the MLP only so that backward has the gate/up outputs ``g``/``u``. With
NF4 base weights that recompute dequantizes gate and up, and backward dequantizes them again for ``dx``.
Here the recompute computes nothing but the small ``x A^T`` factors (see ``LoraMLPFunction``), and backward
walks the intermediate dimension in chunks of rows. For each chunk it:

* dequantizes the chunk's gate and up rows into one ``[2c, hidden]`` buffer;
* computes ``[g | u] = x [W_g; W_u]^T`` in one GEMM;
* runs the activation backward, which writes ``[dg | du]`` over ``[g | u]``, and ``h`` over the matching columns
  of ``dh``, which it has just read;
* takes the chunk's rows of the gate/up ``dB``, and its share of ``t = s d[g|u] B`` (float32 sums);
* accumulates ``dx += [dg | du] [W_g; W_u]`` from the same buffer.

Gate and up are dequantized once per step in backward instead of twice. The MLP's working set shrinks from
the full-width ``g``, ``u``, ``h`` and ``dh`` (4 x tokens x intermediate) to ``dh`` plus one chunk. Down's
weight is dequantized once, for ``dh = dy W_d``, as before. Its LoRA grads come from the full ``h``, which
ends up in ``dh``'s buffer.
"""
from __future__ import annotations

import os

import torch

from ..dequant.weights import dense_rows, is_nf4, weight_rows
from ..lora_gated.reference import LowRank
from . import cast_cache
from .activation import gated_backward_, gated_forward
from .projection import _cat_factors, _scaled, factor_grads, input_grad

# Bytes of the [tokens, 2 x chunk] gate|up buffer; at 2 x 2048 tokens of an 8B Llama that is seven chunks of
# 2,048 rows, and the dequantized [2 x chunk, hidden] buffer is the same size.
CHUNK_BYTES = 32 * 2**20
MODES = ("capture", "always", "never")
_config = {"mode": os.environ.get("PRONGHORN_MLP_CHUNKED_BACKWARD", "capture").strip().lower()}


def set_chunked_mlp_backward(mode: str) -> None:
    """When a recomputed MLP with NF4 gate/up weights uses the chunked backward.

    ``"capture"`` (the default): while a CUDA graph is being captured (:mod:`pronghorn.memory.layer_graphs`).
    The chunks cost the host several times the launches of the full-width path; replaying a graph costs none, and
    the graph's memory pool then holds one chunk instead of full-width activations. Run eagerly on an H100 whose
    host could not keep up, the chunked backward made the step slower (benchmarks/results/2026-11-22-mlp-chunked.md).
    ``"always"``, ``"never"``: regardless of capture (``"always"`` is how the CPU tests reach it).
    """
    if mode not in MODES:
        raise ValueError(f"chunked MLP backward mode must be one of {MODES}, got {mode!r}")
    _config["mode"] = mode


def applies(in_parts) -> bool:
    """Whether a recompute of an MLP with these gate/up parts leaves them to :func:`chunked_backward`."""
    mode = _config["mode"]
    if mode == "never" or not all(is_nf4(p.weight) and p.bias is None for p in in_parts):
        return False
    return mode == "always" or (in_parts[0].weight.is_cuda and torch.cuda.is_current_stream_capturing())


def chunk_rows(tokens: int, inter: int, element_size: int) -> int:
    """Intermediate rows per chunk: as many as fit :data:`CHUNK_BYTES`, split evenly over the chunks needed."""
    fit = max(1, CHUNK_BYTES // max(1, 2 * tokens * element_size))
    chunks = -(-inter // fit)
    return -(-inter // chunks)


def chunked_backward(x2, xas, in_parts, down, dy2, activation: str, fused: bool, dtype, need_dx: bool,
                     need_a: list, need_b: list):
    """``(dx, [dA], [dB])`` of a gated LoRA MLP whose forward kept only ``x2`` and the gate/up ``x A^T``.

    Args:
        x2: the MLP input ``[tokens, hidden]`` in ``dtype``; xas: each gate/up part's ``x A^T`` (None without LoRA).
        in_parts: gate and up (or Phi-3's one gate_up) LoraParts; down: down's.
        dy2: the upstream gradient ``[tokens, hidden]`` in ``dtype``.
        need_dx: whether the input gradient is wanted; need_a, need_b: per part (gate/up first, down last).
    Returns dA/dB in each parameter's dtype, per part in the order of ``[*in_parts, down]``.
    """
    inter = weight_rows(in_parts[0].weight) // (2 if fused else 1)
    # each of gate and up: (its part, the row where its rows start in that part's weight)
    segments = ((0, 0), (0, inter)) if fused else ((0, 0), (1, 0))
    n_in = len(in_parts)
    need_upstream = need_dx or any(need_a[:n_in]) or any(need_b[:n_in])
    a_down = cast_cache.cast(down.A, dtype) if down.A is not None else None
    t_down = {}
    if a_down is not None and (need_upstream or need_a[-1]):
        t_down = factor_grads(None, [None], [down], [dy2], dtype, True, [False], [False])[2]
    need_h = need_a[-1] or need_b[-1]
    dh = input_grad([down], [dy2], {}, dtype) if need_upstream else None
    tokens, hidden = x2.shape
    h = dh if need_h and dh is not None else (x2.new_empty(tokens, inter) if need_h else None)

    bs = [cast_cache.cast(p.B, dtype) if p.B is not None else None for p in in_parts]
    want_t = [p.A is not None and (need_dx or need_a[i]) for i, p in enumerate(in_parts)]
    t_sums = [None] * n_in
    d_bs = [torch.empty(p.B.shape, dtype=p.B.dtype, device=x2.device) if p.B is not None and need_b[i] else None
            for i, p in enumerate(in_parts)]
    xas_scaled = [_scaled(xa, p.scale) if xa is not None else None for p, xa in zip(in_parts, xas)]
    rows = chunk_rows(tokens, inter, x2.element_size())
    w = x2.new_empty(2 * min(rows, inter), hidden)
    dx = None
    for j0 in range(0, inter if need_upstream or need_h else 0, rows):
        c = min(rows, inter - j0)
        wc = w[:2 * c]
        spans = [(i, slice(off + j0, off + j0 + c)) for i, off in segments]
        for k, (i, span) in enumerate(spans):
            dense_rows(in_parts[i].weight, dtype, span.start, span.stop, wc[k * c:(k + 1) * c])
        gu = x2 @ wc.t()
        g, u = gu[:, :c], gu[:, c:]
        low = tuple(LowRank(xas[i], bs[i][span], in_parts[i].scale) if xas[i] is not None else None
                    for i, span in spans)
        if not need_upstream:
            h[:, j0:j0 + c] = gated_forward(g, u, activation, low)
            continue
        low_dh = LowRank(t_down[0], a_down.t()[j0:j0 + c], 1.0) if t_down else None
        gated_backward_(dh[:, j0:j0 + c], g, u, activation, low, low_dh, h_out=h[:, j0:j0 + c] if need_h else None)
        for k, (i, span) in enumerate(spans):  # gu now holds [dg | du]
            d_out = gu[:, k * c:(k + 1) * c]
            if d_bs[i] is not None:
                _mm_into(d_bs[i][span], d_out.t(), xas_scaled[i])
            if want_t[i]:
                t_sums[i] = _accumulate_mm(t_sums[i], d_out, bs[i][span])
        if need_dx:
            dx = gu @ wc if dx is None else dx.addmm_(gu, wc)
    del w

    ts = {i: (t * in_parts[i].scale).to(dtype) for i, t in enumerate(t_sums) if t is not None}
    d_as = factor_grads(x2, xas, in_parts, [None] * n_in, dtype, False, need_a[:n_in], [False] * n_in, ts=ts)[0]
    if need_dx and ts:
        order = list(ts)
        dx.addmm_(_cat_factors(ts, order), cast_cache.cat_rows([in_parts[i].A for i in order], dtype))
    ha = h @ a_down.t() if need_b[-1] and a_down is not None else None
    d_a_down, d_b_down, _ = factor_grads(h, [ha], [down], [dy2], dtype, False, [need_a[-1]], [need_b[-1]],
                                         ts=t_down)
    return dx, d_as + d_a_down, d_bs + d_b_down


def _wide_result(a: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether cuBLAS writes ``a @ b`` straight into ``out_dtype`` (float32 from 16-bit operands, on CUDA)."""
    return a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` in ``out``'s dtype (a LoRA grad's rows), one launch where the GEMM can write it."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif _wide_result(a, out.dtype):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        out.copy_(a @ b)


def _accumulate_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in float32, accumulated in place (a new sum when ``acc`` is None)."""
    if _wide_result(a, torch.float32):
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    product = a.float() @ b.float()
    return product if acc is None else acc.add_(product)
