"""Tiling and launching shared by the gated-activation Triton kernels (``kernels/swiglu``, ``kernels/geglu``).

The kernels work over [rows, cols] views with unit column stride; each program handles a
[ROWS, BLOCK] tile (see :func:`tile_config`). Row offsets are computed in int64 so buffers past
2**31 elements are addressed correctly. A forward kernel takes ``(g, u, h, n_rows, n_cols,
g_stride, u_stride, h_stride)``, a backward kernel ``(dh, g, u, dg, du, n_rows, n_cols, dh_stride,
g_stride, u_stride, dg_stride, du_stride)``, each followed by its own constexprs, then ROWS and BLOCK.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.compiled_launch import launch


@triton.jit
def row_tile(n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Row offsets (int64, [ROWS, 1]), column offsets ([1, BLOCK]) and the in-bounds mask of this program's tile."""
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    return rows, cols, (rows < n_rows) & (cols < n_cols)


def tile_config(n_rows: int, n_cols: int, on_gpu: bool) -> dict:
    """Tile and launch settings for an elementwise [n_rows, n_cols] kernel.

    Up to 1024 columns per tile, then as many rows as fill 4096 elements on GPU (short rows
    still get wide tiles) or 16384 under the CPU interpreter, whose cost is per program.
    """
    block = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    budget = 4096 if on_gpu else 16384
    rows = min(triton.next_power_of_2(max(n_rows, 1)), max(1, budget // block))
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block))
    return {"grid": grid, "ROWS": rows, "BLOCK": block, "num_warps": 8 if rows * block >= 2048 else 4}


def _launch(kernel, n_rows: int, n_cols: int, on_gpu: bool, args: tuple, constexprs: dict) -> None:
    cfg = tile_config(n_rows, n_cols, on_gpu)
    launch(kernel, cfg["grid"], args, {**constexprs, "ROWS": cfg["ROWS"], "BLOCK": cfg["BLOCK"]},
           num_warps=cfg["num_warps"])


def launch_gated_forward(kernel, g: torch.Tensor, u: torch.Tensor, **constexprs) -> torch.Tensor:
    """Run the forward ``kernel`` on 2-D ``g``/``u`` (unit column stride); returns a new contiguous ``h``."""
    n_rows, n_cols = g.shape
    h = torch.empty((n_rows, n_cols), dtype=g.dtype, device=g.device)
    if h.numel() == 0:
        return h
    _launch(kernel, n_rows, n_cols, g.is_cuda,
            (g, u, h, n_rows, n_cols, g.stride(0), u.stride(0), h.stride(0)), constexprs)
    return h


def launch_gated_backward(kernel, dh, g, u, dg, du, **constexprs) -> None:
    """Run the backward ``kernel``: ``dL/dg`` into ``dg``, ``dL/du`` into ``du`` (either may alias ``g``/``u``)."""
    n_rows, n_cols = g.shape
    if g.numel() == 0:
        return
    _launch(kernel, n_rows, n_cols, g.is_cuda,
            (dh, g, u, dg, du, n_rows, n_cols, dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0)),
            constexprs)
