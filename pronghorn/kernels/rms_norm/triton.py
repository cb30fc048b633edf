"""Triton kernels for RMSNorm.

One program normalises one row in the forward pass (the whole row sits in registers, so the
statistic and the output come from a single read of ``x``). The backward pass gives each program a
contiguous block of rows and keeps a private fp32 partial sum of ``dw``; the partials are summed
afterwards, which avoids atomics and keeps the result deterministic. Row layout, block sizing and
row splitting are shared with LayerNorm (:mod:`pronghorn.kernels.norm_rows`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.compiled_launch import launch
from pronghorn.kernels.norm_rows import load_program_row, program_rows, row_block, split_rows, warps_for_block


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    x_row_stride, y_row_stride, n_cols, eps, offset,
    CAST_LLAMA: tl.constexpr, INT64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row, cols, mask, x = load_program_row(X, x_row_stride, n_cols, INT64, BLOCK_N)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = x * rstd
    if CAST_LLAMA:
        # Llama rounds the normalised row to the input dtype and forms (offset + w) in the weight
        # dtype before the product; both roundings are reproduced so results match bit for bit.
        normed = normed.to(X.dtype.element_ty).to(tl.float32)
        scale = (w + offset).to(W.dtype.element_ty).to(tl.float32)
    else:
        scale = w + offset
    tl.store(Y + row * y_row_stride + cols, (normed * scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, offset, rows_per_program,
    CAST_LLAMA: tl.constexpr, COMPUTE_DW: tl.constexpr, INT64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if CAST_LLAMA:
        scale = (w + offset).to(W.dtype.element_ty).to(tl.float32)
    else:
        scale = w + offset
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start, row_end = program_rows(n_rows, rows_per_program, INT64)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = x * rstd
        dnormed = dy * scale
        dx = (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / n_cols)) * rstd
        tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if CAST_LLAMA:
                normed = normed.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += dy * normed
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def rms_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_llama: bool,
    out_dtype: torch.dtype, int64: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on a ``[rows, cols]`` view; returns ``(y2d, rstd)``."""
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block = row_block(n_cols)
    launch(_rms_norm_fwd_kernel, (n_rows,),
           (x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n_cols, eps, offset),
           dict(CAST_LLAMA=cast_llama, INT64=int64, BLOCK_N=block), num_warps=warps_for_block(block))
    return y, rstd


def rms_norm_bwd(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
    cast_llama: bool, compute_dw: bool, dx2d: torch.Tensor, int64: bool,
) -> torch.Tensor | None:
    """Write ``dx`` into ``dx2d`` (which may alias ``dy2d``) and return ``dw`` (fp32) or None."""
    n_rows, n_cols = x2d.shape
    programs, rows_per_program = split_rows(n_rows, x2d.device, per_sm=2 if compute_dw else 8)
    partial = torch.empty((programs, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2d.device)
    block = row_block(n_cols)
    launch(_rms_norm_bwd_kernel, (programs,),
           (dy2d, x2d, weight, rstd, dx2d, partial,
            dy2d.stride(0), x2d.stride(0), dx2d.stride(0), n_rows, n_cols, offset, rows_per_program),
           dict(CAST_LLAMA=cast_llama, COMPUTE_DW=compute_dw, INT64=int64, BLOCK_N=block),
           num_warps=warps_for_block(block))
    return partial.sum(0) if compute_dw else None
