"""Triton kernels for the fused LM-head cross-entropy.

``_ce_rows_kernel``: each program takes ROWS token rows of a logits chunk. Pass 1 streams them
once for each row's logsumexp (online max/sum, fp32) and target logit; pass 2 streams them again
and overwrites them with ``d loss_row / d logits``. Row offsets are int64: a chunk of logits easily
passes 2**31 elements (65536 rows x 128256 vocab). With ``STATS`` pass 1 also yields, per row, the
entropy of ``softmax(y)`` (``lse - sum_j p_j y_j``, the sum kept online like ``s``) and whether the
label is the argmax (first index on ties, as ``torch.argmax``): the training metrics that would
otherwise need the logits.

``_scale_kernel``: ``dst = src * factor`` with ``factor`` read from device memory in fp32, so
gradients are rescaled exactly in fp32 without a host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.compiled_launch import launch


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    z = x * logit_scale
    if HAS_SOFTCAP:
        # softcap * tanh(z / softcap), with tanh through exp(-2|u|) so it never overflows.
        u = z / softcap
        e = tl.exp(-2.0 * tl.where(u >= 0, u, -u))
        t = (1.0 - e) / (1.0 + e)
        z = softcap * tl.where(u >= 0, t, -t)
    return z


@triton.jit
def _ce_rows_kernel(
    logits_ptr, logits_stride, labels_ptr, loss_ptr, entropy_ptr, top1_ptr, n_rows, n_cols, ignore_index,
    logit_scale, softcap, HAS_SOFTCAP: tl.constexpr, STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    base = logits_ptr + rows[:, None] * logits_stride
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = labels != ignore_index

    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], dtype=tl.float32)
    target = tl.zeros([ROWS], dtype=tl.float32)
    if STATS:
        sy = tl.zeros([ROWS], dtype=tl.float32)  # sum_j exp(y_j - m) y_j, rescaled with s
        best = tl.zeros([ROWS], dtype=tl.int64)  # argmax so far
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        col_ok = cols < n_cols
        x = tl.load(base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        # Padding columns are -inf so they vanish from max and sum; padding rows stay finite (x = 0).
        y = tl.where(col_ok[None, :], _transform(x, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
        block_max = tl.max(y, 1)
        m_new = tl.maximum(m, block_max)
        e = tl.exp(y - m_new[:, None])
        rescale = tl.exp(m - m_new)
        s = s * rescale + tl.sum(e, 1)
        if STATS:
            # e is 0 on padding columns; zeroing y there too keeps 0 * -inf (NaN) out of the sum.
            sy = sy * rescale + tl.sum(e * tl.where(col_ok[None, :], y, 0.0), 1)
            # Strictly greater: on a tie the earlier block (lower index) keeps the argmax.
            best = tl.where(block_max > m, start + tl.argmax(y, 1).to(tl.int64), best)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], y, 0.0), 1)
    lse = m + tl.log(s)
    tl.store(loss_ptr + rows, tl.where(valid, lse - target, 0.0), mask=row_ok)
    if STATS:
        tl.store(entropy_ptr + rows, tl.where(valid, lse - sy / s, 0.0), mask=row_ok)
        tl.store(top1_ptr + rows, tl.where(valid & (best == labels), 1.0, 0.0), mask=row_ok)

    # Ignored rows get a zero gradient row, so the matmuls that follow need no masking.
    factor = tl.where(valid, logit_scale, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _transform(x, logit_scale, softcap, HAS_SOFTCAP)
        d = tl.exp(y - lse[:, None]) - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        if HAS_SOFTCAP:
            r = y / softcap
            d = d * (1.0 - r * r)
        d = d * factor[:, None]
        tl.store(base + cols[None, :], d.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(src_ptr, dst_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f = tl.load(factor_ptr).to(tl.float32)
    v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (v * f).to(dst_ptr.dtype.element_ty), mask=mask)


def ce_tile_config(n_cols: int, on_gpu: bool) -> tuple[int, int]:
    """(rows per program, columns per step of the row loop). GPU: one row per program and wide
    4096-column steps, enough programs to fill the device for any realistic token count. CPU
    interpreter, whose cost is per program and per step: 16 rows and 256 columns, which also
    sends small test vocabularies through the multi-step path."""
    if on_gpu:
        return 1, min(triton.next_power_of_2(max(n_cols, 1)), 4096)
    return 16, min(triton.next_power_of_2(max(n_cols, 1)), 256)


def ce_rows_inplace(logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor, ignore_index: int,
                    logit_scale: float, softcap: float | None, entropy_out: torch.Tensor | None = None,
                    top1_out: torch.Tensor | None = None) -> None:
    """Write each row's loss into ``loss_out`` (fp32) and overwrite ``logits`` [rows, V] (unit
    column stride) with the gradient of the unnormalised summed loss w.r.t. those logits.

    With ``entropy_out`` and ``top1_out`` (fp32 ``[rows]``, both or neither) also write each row's
    entropy and 1.0 where the label is the argmax; ignored rows get 0 in all three.
    """
    rows, n_cols = logits.shape
    if rows == 0:
        return
    if (entropy_out is None) != (top1_out is None):
        raise ValueError("ce_rows_inplace: pass both entropy_out and top1_out, or neither")
    stats = entropy_out is not None
    per_program, block = ce_tile_config(n_cols, logits.is_cuda)
    launch(_ce_rows_kernel, (triton.cdiv(rows, per_program),),
           (logits, logits.stride(0), labels, loss_out, entropy_out if stats else loss_out,
            top1_out if stats else loss_out, rows, n_cols, ignore_index, float(logit_scale),
            float(softcap) if softcap is not None else 1.0),
           dict(HAS_SOFTCAP=softcap is not None, STATS=stats, ROWS=per_program, BLOCK=block),
           num_warps=8 if per_program * block >= 2048 else 4)


def scale_into(src: torch.Tensor, dst: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``dst = src * factor`` elementwise in fp32 (contiguous ``src``/``dst``, may be the same tensor);
    ``factor`` is a one-element tensor on the same device."""
    n = src.numel()
    if n:
        block = 2048
        launch(_scale_kernel, (triton.cdiv(n, block),), (src, dst, factor, n), dict(BLOCK=block), num_warps=4)
    return dst
