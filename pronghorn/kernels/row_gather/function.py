"""``gather_rows``: ``table[ids]`` on a chosen device, reading a host-resident table from the GPU when it can.

No gradient flows to the table: it serves frozen embeddings (:mod:`pronghorn.memory.host_embedding`).
"""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import interpreter_on, triton_importable
from pronghorn.kernels.row_gather.reference import gather_rows_reference


def _kernel_reads(table: torch.Tensor, device: torch.device) -> bool:
    """Whether the Triton kernel can do this gather: a CUDA output with the table in device or pinned host
    memory, or everything on the CPU under the interpreter (tests)."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return table.is_cuda or (table.device.type == "cpu" and table.is_pinned())
    return interpreter_on() and device.type == "cpu" and table.device.type == "cpu"


def gather_rows(table: torch.Tensor, ids: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``table[ids]``, shaped ``ids.shape + (dim,)``, on ``device`` (default: where ``ids`` are).

    Args:
        table: ``[rows, dim]`` floating-point table whose rows are contiguous; may be in pinned host memory.
        ids: integer indices of any shape, on the CPU or the output device.
        device: where the result goes.

    With the kernel, an id outside ``[0, rows)`` gives a row of NaNs instead of an error (checking on the
    host would wait for the GPU); callers that want the error check first (see ``HostEmbedding``).
    """
    if table.dim() != 2 or not table.is_floating_point():
        raise ValueError(f"gather_rows: the table must be a 2-D floating-point tensor, got shape "
                         f"{tuple(table.shape)} and dtype {table.dtype}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"gather_rows: ids must be integers, got {ids.dtype}")
    device = torch.device(device) if device is not None else ids.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not _kernel_reads(table, device):
        return gather_rows_reference(table, ids, device)
    if table.stride(1) != 1:
        table = table.contiguous()
    flat = ids.reshape(-1).to(device, non_blocking=True).contiguous()
    out = torch.empty((flat.numel(), table.shape[1]), dtype=table.dtype, device=device)
    from pronghorn.kernels.row_gather.triton import gather_rows_triton

    if device.type == "cuda":
        with torch.cuda.device(device):
            gather_rows_triton(table, flat, out)
    else:
        gather_rows_triton(table, flat, out)
    return out.view(*ids.shape, table.shape[1])
