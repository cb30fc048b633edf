"""Triton kernels for RMSNorm, plus the row-layout and launch helpers that the row-wise norms share.

One program normalises one row in the forward pass (the whole row sits in registers, so the
statistic and the output come from a single read of ``x``). The backward pass gives each program a
contiguous block of rows and keeps a private fp32 partial sum of ``dw``; the partials are summed
afterwards, which avoids atomics and keeps the result deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.backend import needs_int64

# A row lives in registers; past this width the register file spills badly, so callers fall back.
MAX_FUSED_COLS = 65536


def row_block(n_cols: int) -> int:
    return triton.next_power_of_2(max(n_cols, 1))


def warps_for_block(block: int) -> int:
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    if block <= 16384:
        return 16
    return 32


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, cols]`` with unit column stride and one row stride, copying only if it must."""
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        return t.contiguous().view(-1, n)
    # Leading dims collapse into one row stride when each (non-trivial) dim steps over the next.
    dims = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s != 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != inner * size:
            return t.contiguous().view(-1, n)
    row_stride = dims[-1][1] if dims else n
    rows = 1
    for s, _ in dims:
        rows *= s
    return t.as_strided((rows, n), (row_stride, 1))


def offsets_need_int64(*tensors: torch.Tensor) -> bool:
    """Whether the furthest element of any tensor (by its strides, as a kernel addresses it) is past int32.

    ``needs_int64`` looks at element counts; a sliced view can reach further into its storage than
    its count suggests, so the strided extent is checked too.
    """
    if needs_int64(*tensors):
        return True
    return any(sum((s - 1) * st for s, st in zip(t.shape, t.stride())) >= 2**31 - 1 for t in tensors if t.numel())


def can_write_rows_into(buf: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> bool:
    """Whether ``buf`` may be overwritten as an output of ``shape``/``dtype``: dense, row-major, unshared dims."""
    return buf.dtype == dtype and buf.shape == shape and buf.is_contiguous()


def reduction_programs(n_rows: int, device: torch.device, per_sm: int) -> int:
    """How many programs share the rows of a backward pass that reduces over rows."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, sms * per_sm))
    # The interpreter runs programs one after another; a few keep the partial-sum path exercised.
    return max(1, min(n_rows, 4))


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    x_row_stride, y_row_stride, n_cols, eps, offset,
    CAST_LLAMA: tl.constexpr, INT64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    if INT64:
        row = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
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
    if INT64:
        row_start = pid.to(tl.int64) * rows_per_program
    else:
        row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
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
    _rms_norm_fwd_kernel[(n_rows,)](
        x2d, weight, y, rstd,
        x2d.stride(0), y.stride(0), n_cols, eps, offset,
        CAST_LLAMA=cast_llama, INT64=int64, BLOCK_N=block, num_warps=warps_for_block(block),
    )
    return y, rstd


def rms_norm_bwd(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
    cast_llama: bool, compute_dw: bool, dx2d: torch.Tensor, int64: bool,
) -> torch.Tensor | None:
    """Write ``dx`` into ``dx2d`` (which may alias ``dy2d``) and return ``dw`` (fp32) or None."""
    n_rows, n_cols = x2d.shape
    programs = reduction_programs(n_rows, x2d.device, per_sm=2 if compute_dw else 8)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty((programs, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2d.device)
    block = row_block(n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        dy2d, x2d, weight, rstd, dx2d, partial,
        dy2d.stride(0), x2d.stride(0), dx2d.stride(0), n_rows, n_cols, offset, rows_per_program,
        CAST_LLAMA=cast_llama, COMPUTE_DW=compute_dw, INT64=int64, BLOCK_N=block,
        num_warps=warps_for_block(block),
    )
    return partial.sum(0) if compute_dw else None
