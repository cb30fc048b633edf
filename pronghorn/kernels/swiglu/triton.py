"""Triton kernels for SwiGLU, ``h = silu(g) * u``, over a [rows, cols] view with unit column stride.

Each program handles one row block of ``BLOCK`` columns. Row offsets are computed in int64 so
buffers past 2**31 elements are addressed correctly. All math is fp32; results are rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_cols, g_stride, u_stride, h_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    h = g * sig * u
    tl.store(h_ptr + row * h_stride + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_cols,
    dh_stride, g_stride, u_stride, dg_stride, du_stride, BLOCK: tl.constexpr,
):
    # dg/du may alias g/u (in-place backward): every element is read before it is written,
    # and each program touches only its own elements, so aliasing is safe.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + row * dg_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * du_stride + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    return min(triton.next_power_of_2(max(n_cols, 1)), 1024)


def _grid(rows: int, n_cols: int, block: int):
    return (rows, triton.cdiv(n_cols, block))


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h = silu(g) * u`` for 2-D ``g``/``u`` with unit column stride; returns a contiguous ``h``."""
    rows, n_cols = g.shape
    h = torch.empty((rows, n_cols), dtype=g.dtype, device=g.device)
    if h.numel() == 0:
        return h
    block = _block(n_cols)
    _swiglu_fwd_kernel[_grid(rows, n_cols, block)](
        g, u, h, n_cols, g.stride(0), u.stride(0), h.stride(0), BLOCK=block, num_warps=4 if block <= 512 else 8
    )
    return h


def swiglu_backward(dh, g, u, dg, du) -> None:
    """Write ``dL/dg`` into ``dg`` and ``dL/du`` into ``du`` (either may alias ``g``/``u``)."""
    rows, n_cols = g.shape
    if g.numel() == 0:
        return
    block = _block(n_cols)
    _swiglu_bwd_kernel[_grid(rows, n_cols, block)](
        dh, g, u, dg, du, n_cols,
        dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
        BLOCK=block, num_warps=4 if block <= 512 else 8,
    )
