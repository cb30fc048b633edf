"""Row layout, block sizing and row splitting shared by the row-wise norm kernels (``kernels/rms_norm``,
``kernels/layer_norm``).

Forward kernels normalise one row per program with the whole row in registers
(:func:`load_program_row`). Backward kernels give each program a contiguous block of rows
(:func:`split_rows`, :func:`program_rows`) and keep private fp32 partial sums of the weight
gradients, summed afterwards: no atomics, deterministic.
Imports Triton: the norms import this module only once :func:`~pronghorn.kernels.backend.use_triton`
has said the kernels can run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.backend import offsets_need_int64  # noqa: F401  (the norms' functions import it from here)

# A row lives in registers; past this width the register file spills badly, so callers fall back.
MAX_FUSED_COLS = 65536


def row_block(n_cols: int) -> int:
    """The power-of-two block that holds a whole row of ``n_cols``."""
    return triton.next_power_of_2(max(n_cols, 1))


def warps_for_block(block: int) -> int:
    """Warps for a program working on one row block of ``block`` elements."""
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


def can_write_rows_into(buf: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> bool:
    """Whether ``buf`` may be overwritten as an output of ``shape``/``dtype``: dense, row-major, unshared dims."""
    return buf.dtype == dtype and buf.shape == shape and buf.is_contiguous()


def backward_rows(dy: torch.Tensor, x2d: torch.Tensor, x_shape: torch.Size, x_dtype: torch.dtype,
                  in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy2d, dx2d)`` for a norm's backward: the incoming gradient as rows, and where ``dx`` goes.

    With ``in_place`` (the caller promises nobody else reads ``dy``) ``dx`` is written over ``dy``
    when its layout allows; otherwise into a new buffer of ``x``'s dtype.
    """
    dy2d = rows_view(dy)
    if in_place and can_write_rows_into(dy, x_shape, x_dtype):
        return dy2d, dy2d
    return dy2d, torch.empty(x2d.shape, dtype=x_dtype, device=x2d.device)


def split_rows(n_rows: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """``(programs, rows_per_program)`` for a backward pass that reduces over rows.

    On CUDA, up to ``per_sm`` programs per multiprocessor; the interpreter runs programs one after
    another, so a few there keep the partial-sum path exercised. No program is left without rows.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = max(1, min(n_rows, sms * per_sm))
    else:
        programs = max(1, min(n_rows, 4))
    rows_per_program = triton.cdiv(n_rows, programs)
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


@triton.jit
def load_program_row(X, row_stride, n_cols, INT64: tl.constexpr, BLOCK_N: tl.constexpr):
    """For a forward kernel (one row per program): ``(row, cols, mask, x)``, the row index (int64 when
    ``INT64``), the column offsets and mask, and the row of ``X`` in fp32 (0 past ``n_cols``)."""
    row = tl.program_id(0)
    if INT64:
        row = row.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    return row, cols, mask, x


@triton.jit
def program_rows(n_rows, rows_per_program, INT64: tl.constexpr):
    """``[row_start, row_end)`` of this program's block of rows (int64 offsets when ``INT64``)."""
    pid = tl.program_id(0)
    if INT64:
        row_start = pid.to(tl.int64) * rows_per_program
    else:
        row_start = pid * rows_per_program
    return row_start, tl.minimum(row_start + rows_per_program, n_rows)
