"""Triton kernel for the row gather: one program copies one block of one output row.

The table may live in pinned host memory: a CUDA kernel reads it over PCIe through unified virtual addressing
(Triton accepts pinned pointers), so a lookup needs no host-side gather and no wait for the ids to reach the
host. Each row is contiguous, so every program issues wide reads that PCIe serves at its full rate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 2048


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, n_table_rows, dim, table_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    index = tl.load(ids_ptr + row).to(tl.int64)
    in_table = (index >= 0) & (index < n_table_rows)
    # An id outside the table reads nothing (a stray read of host memory could fault) and gives a NaN row.
    read_cols = tl.where(in_table, dim, 0)  # a scalar bound: the interpreter rejects scalar & block masks
    values = tl.load(table_ptr + index * table_row_stride + cols, mask=cols < read_cols, other=float("nan"))
    tl.store(out_ptr + row * dim + cols, values, mask=cols < dim)


def gather_rows_triton(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (``[ids.numel(), dim]``, contiguous) with ``table[ids]``; ``ids`` contiguous, 1-D."""
    n, dim = out.shape
    if n == 0 or dim == 0:
        return out
    block = min(triton.next_power_of_2(dim), MAX_BLOCK)
    _gather_rows_kernel[(n, triton.cdiv(dim, block))](
        table, ids, out, table.shape[0], dim, table.stride(0), BLOCK=block, num_warps=4)
    return out
