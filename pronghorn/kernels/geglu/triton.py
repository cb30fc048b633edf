"""Triton kernels for GeGLU, ``h = gelu(g) * u``, over a [rows, cols] view with unit column stride.

``APPROX_TANH`` selects ``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))`` (PyTorch's
``approximate="tanh"``) or the exact ``g * Phi(g)`` with ``Phi(g) = 0.5 (1 + erf(g / sqrt 2))``.
tanh is written through ``exp`` because Triton's math namespaces differ between releases.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.gated_launch import launch_gated_backward, launch_gated_forward, row_tile

# The constants are written inline in the kernels: Triton on GPU rejects plain module globals,
# and the CPU interpreter mishandles tl.constexpr globals on the left of an operator.
# sqrt(2/pi) = 0.7978845608028654, kappa = 0.044715, 1/sqrt(2) = 0.7071067811865476,
# 1/sqrt(2 pi) = 0.3989422804014327.


@triton.jit
def _tanh(z):
    # (1 - e) / (1 + e) with e = exp(-2|z|) never overflows and saturates cleanly to +-1.
    e = tl.exp(-2.0 * tl.where(z >= 0, z, -z))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, r, -r)


@triton.jit
def _gelu_and_grad(g, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        act = 0.5 * g * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        grad = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return act, grad


@triton.jit
def _geglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_rows, n_cols, g_stride, u_stride, h_stride,
                      APPROX_TANH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols, mask = row_tile(n_rows, n_cols, ROWS, BLOCK)
    g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if APPROX_TANH:
        act = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    tl.store(h_ptr + rows * h_stride + cols, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_rows, n_cols,
    dh_stride, g_stride, u_stride, dg_stride, du_stride,
    APPROX_TANH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # dg/du may alias g/u: each element is read before it is written, by one program only.
    rows, cols, mask = row_tile(n_rows, n_cols, ROWS, BLOCK)
    dh = tl.load(dh_ptr + rows * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, grad = _gelu_and_grad(g, APPROX_TANH)
    tl.store(dg_ptr + rows * dg_stride + cols, (dh * u * grad).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows * du_stride + cols, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)


def geglu_forward(g: torch.Tensor, u: torch.Tensor, approx_tanh: bool) -> torch.Tensor:
    """``h = gelu(g) * u`` for 2-D ``g``/``u`` with unit column stride; returns a contiguous ``h``."""
    return launch_gated_forward(_geglu_fwd_kernel, g, u, APPROX_TANH=approx_tanh)


def geglu_backward(dh, g, u, dg, du, approx_tanh: bool) -> None:
    """Write ``dL/dg`` into ``dg`` and ``dL/du`` into ``du`` (either may alias ``g``/``u``)."""
    launch_gated_backward(_geglu_bwd_kernel, dh, g, u, dg, du, APPROX_TANH=approx_tanh)
