"""Triton kernels for LayerNorm: one row per program forward, row blocks with fp32 partial sums backward.

Row layout, block sizing and row splitting are shared with RMSNorm (:mod:`pronghorn.kernels.norm_rows`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.compiled_launch import launch
from pronghorn.kernels.norm_rows import load_program_row, program_rows, row_block, split_rows, warps_for_block


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    x_row_stride, y_row_stride, n_cols, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, INT64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row, cols, mask, x = load_program_row(X, x_row_stride, n_cols, INT64, BLOCK_N)
    mean = tl.sum(x, axis=0) / n_cols
    # Two-pass variance from the centred row (already in registers): no cancellation as in E[x^2]-E[x]^2.
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, rows_per_program,
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    INT64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start, row_end = program_rows(n_rows, rows_per_program, INT64)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            dxhat = dy * w
        else:
            dxhat = dy
        c_xhat = tl.sum(dxhat * xhat, axis=0) / n_cols
        c_one = tl.sum(dxhat, axis=0) / n_cols
        dx = (dxhat - xhat * c_xhat - c_one) * rstd
        tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid * n_cols + cols, db_acc, mask=mask)


def layer_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, int64: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on a ``[rows, cols]`` view; returns ``(y2d, mean, rstd)``."""
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block = row_block(n_cols)
    launch(_layer_norm_fwd_kernel, (n_rows,),
           (x2d, weight if weight is not None else x2d, bias if bias is not None else x2d, y, mean, rstd,
            x2d.stride(0), y.stride(0), n_cols, eps),
           dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, INT64=int64, BLOCK_N=block),
           num_warps=warps_for_block(block))
    return y, mean, rstd


def layer_norm_bwd(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
    compute_dw: bool, compute_db: bool, dx2d: torch.Tensor, int64: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Write ``dx`` into ``dx2d`` (which may alias ``dy2d``); return fp32 ``(dw, db)``, None where not asked."""
    n_rows, n_cols = x2d.shape
    programs, rows_per_program = split_rows(n_rows, x2d.device, per_sm=2 if (compute_dw or compute_db) else 8)
    shape = (programs, n_cols)
    dw_partial = torch.empty(shape if compute_dw else (1,), dtype=torch.float32, device=x2d.device)
    db_partial = torch.empty(shape if compute_db else (1,), dtype=torch.float32, device=x2d.device)
    block = row_block(n_cols)
    launch(_layer_norm_bwd_kernel, (programs,),
           (dy2d, x2d, weight if weight is not None else x2d, mean, rstd, dx2d, dw_partial, db_partial,
            dy2d.stride(0), x2d.stride(0), dx2d.stride(0), n_rows, n_cols, rows_per_program),
           dict(HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, INT64=int64,
                BLOCK_N=block),
           num_warps=warps_for_block(block))
    return (dw_partial.sum(0) if compute_dw else None), (db_partial.sum(0) if compute_db else None)
