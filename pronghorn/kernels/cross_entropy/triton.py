"""Triton kernels for the fused LM-head cross-entropy.

``_ce_rows_kernel``: one program per token row of a logits chunk. Pass 1 streams the row once
to get the logsumexp (online max/sum, fp32) and the target logit; pass 2 streams it again and
overwrites it with ``dloss_row / dlogits``. Row offsets are int64: a chunk of logits easily
passes 2**31 elements (65536 rows x 128256 vocab).

``_scale_kernel``: ``dst = src * factor`` with ``factor`` read from device memory in fp32, so
gradients are rescaled exactly in fp32 without a host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    z = x * logit_scale
    if HAS_SOFTCAP:
        # softcap * tanh(z / softcap), with tanh through exp(-2|u|) so it never overflows.
        u = z / softcap
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        z = softcap * tl.where(u >= 0, t, -t)
    return z


@triton.jit
def _ce_rows_kernel(
    logits_ptr, logits_stride, labels_ptr, loss_ptr, n_cols, ignore_index, logit_scale, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    m = float("-inf")
    s = 0.0
    target = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, _transform(x, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(y, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), 0)
        m = m_new
        target += tl.sum(tl.where(cols == label, y, 0.0), 0)
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    # Ignored rows get a zero gradient row, so the matmuls that follow need no masking.
    keep = tl.where(valid, 1.0, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        y = _transform(x, logit_scale, softcap, HAS_SOFTCAP)
        d = tl.exp(y - lse) - tl.where(cols == label, 1.0, 0.0)
        if HAS_SOFTCAP:
            r = y / softcap
            d = d * (1.0 - r * r)
        d = d * (logit_scale * keep)
        tl.store(base + cols, d.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(src_ptr, dst_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f = tl.load(factor_ptr).to(tl.float32)
    v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (v * f).to(dst_ptr.dtype.element_ty), mask=mask)


def ce_block_size(n_cols: int, on_gpu: bool) -> int:
    """Columns per step of the row loop: large on GPU to keep loads wide; small under the CPU
    interpreter, where it also makes small test vocabularies take the multi-block path."""
    return min(triton.next_power_of_2(max(n_cols, 1)), 4096 if on_gpu else 256)


def ce_rows_inplace(logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor, ignore_index: int,
                    logit_scale: float, softcap: float | None) -> None:
    """Write each row's loss into ``loss_out`` (fp32) and overwrite ``logits`` [rows, V] (unit
    column stride) with the gradient of the unnormalised summed loss w.r.t. those logits."""
    rows, n_cols = logits.shape
    if rows == 0:
        return
    block = ce_block_size(n_cols, logits.is_cuda)
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, loss_out, n_cols, ignore_index, float(logit_scale),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )


def scale_into(src: torch.Tensor, dst: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``dst = src * factor`` elementwise in fp32 (contiguous ``src``/``dst``, may be the same tensor);
    ``factor`` is a one-element tensor on the same device."""
    n = src.numel()
    if n:
        block = 2048
        _scale_kernel[(triton.cdiv(n, block),)](src, dst, factor, n, BLOCK=block, num_warps=4)
    return dst
