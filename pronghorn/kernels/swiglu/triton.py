"""Triton kernels for SwiGLU, ``h = silu(g) * u``, over a [rows, cols] view with unit column stride.

Each program handles a [ROWS, BLOCK] tile (see :func:`tile_config`). Row offsets are computed in
int64 so buffers past 2**31 elements are addressed correctly. All math is fp32; results are
rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_rows, n_cols, g_stride, u_stride, h_stride,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    h = g * sig * u
    tl.store(h_ptr + rows * h_stride + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_rows, n_cols,
    dh_stride, g_stride, u_stride, dg_stride, du_stride, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # dg/du may alias g/u (in-place backward): every element is read before it is written,
    # and each program touches only its own elements, so aliasing is safe.
    rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    dh = tl.load(dh_ptr + rows * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + rows * dg_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows * du_stride + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


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


def _launch(kernel, cfg: dict, *args) -> None:
    kernel[cfg["grid"]](*args, ROWS=cfg["ROWS"], BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h = silu(g) * u`` for 2-D ``g``/``u`` with unit column stride; returns a contiguous ``h``."""
    rows, n_cols = g.shape
    h = torch.empty((rows, n_cols), dtype=g.dtype, device=g.device)
    if h.numel() == 0:
        return h
    cfg = tile_config(rows, n_cols, g.is_cuda)
    _launch(_swiglu_fwd_kernel, cfg, g, u, h, rows, n_cols, g.stride(0), u.stride(0), h.stride(0))
    return h


def swiglu_backward(dh, g, u, dg, du) -> None:
    """Write ``dL/dg`` into ``dg`` and ``dL/du`` into ``du`` (either may alias ``g``/``u``)."""
    rows, n_cols = g.shape
    if g.numel() == 0:
        return
    cfg = tile_config(rows, n_cols, g.is_cuda)
    _launch(_swiglu_bwd_kernel, cfg, dh, g, u, dg, du, rows, n_cols,
            dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0))
