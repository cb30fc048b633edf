"""Triton kernels for SwiGLU, ``h = silu(g) * u``, over a [rows, cols] view with unit column stride.

Tiling and launching are shared with GeGLU (:mod:`pronghorn.kernels.gated_launch`). All math is
fp32; results are rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.gated_launch import launch_gated_backward, launch_gated_forward, row_tile


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_rows, n_cols, g_stride, u_stride, h_stride,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols, mask = row_tile(n_rows, n_cols, ROWS, BLOCK)
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
    rows, cols, mask = row_tile(n_rows, n_cols, ROWS, BLOCK)
    dh = tl.load(dh_ptr + rows * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + rows * dg_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows * du_stride + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h = silu(g) * u`` for 2-D ``g``/``u`` with unit column stride; returns a contiguous ``h``."""
    return launch_gated_forward(_swiglu_fwd_kernel, g, u)


def swiglu_backward(dh, g, u, dg, du) -> None:
    """Write ``dL/dg`` into ``dg`` and ``dL/du`` into ``du`` (either may alias ``g``/``u``)."""
    launch_gated_backward(_swiglu_bwd_kernel, dh, g, u, dg, du)
