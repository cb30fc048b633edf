"""Triton kernels of the LoRA-corrected gated activation over [rows, cols] views with unit column stride.

Each program owns a [ROWS, BLOCK] tile of ``g``/``u``; the LoRA term of the tile is one small
``[ROWS, r] @ [r, BLOCK]`` ``tl.dot`` of ``xa`` rows and ``B`` rows, so the extra reads are
``(ROWS + BLOCK) * r`` elements per tile (L2-resident: ``B`` is at most a few MB) against the
``3 * ROWS * BLOCK`` the activation moves anyway. All math is fp32; results are rounded once.

Backward can take a third low-rank term, the down projection's share of ``dh`` (``s (dy B_d) A_d``,
with ``A_d^T`` as its ``B``, any strides): ``dh`` then arrives without it and is never rewritten. It can
also write the forward's ``h`` from the values it has loaded anyway, for the down projection's LoRA grads.

The dot runs in the inputs' 16-bit dtype with an fp32 accumulator. fp32 inputs, and every input
under the CPU interpreter (whose bf16 ``tl.dot`` is wrong), are multiplied in IEEE fp32 instead.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pronghorn.kernels.backend import interpreter_on
from pronghorn.kernels.compiled_launch import launch
from pronghorn.kernels.geglu.triton import _gelu_and_grad
from pronghorn.kernels.gated_launch import row_tile
from pronghorn.kernels.lora_gated.reference import LowRank

ACT_CODES = {"swiglu": 0, "geglu_tanh": 1, "geglu_exact": 2}


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    return _gelu_and_grad(g, ACT == 1)


@triton.jit
def _factor_b(b_ptr, cols, n_cols, rank, b_stride, b_kstride, HAS: tl.constexpr, R: tl.constexpr,
              IEEE: tl.constexpr):
    """``B[cols]^T`` as an [R, BLOCK] tile (``R``: the rank padded to a power of two >= 16), loaded once per program."""
    k = tl.arange(0, R)[:, None]
    if HAS:
        bt = tl.load(b_ptr + cols * b_stride + k * b_kstride, mask=(cols < n_cols) & (k < rank), other=0.0)
    else:
        bt = tl.zeros([R, cols.shape[1]], dtype=tl.float32)
    if IEEE:
        bt = bt.to(tl.float32)
    return bt


@triton.jit
def _load_corrected(t_ptr, t_stride, xa_ptr, bt, rows, cols, mask, n_rows, rank, xa_stride, scale,
                    HAS: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr):
    """``t + scale * xa[rows] @ bt`` for one tile, in fp32 (``t`` alone without a LoRA term)."""
    t = tl.load(t_ptr + rows * t_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS:
        k = tl.arange(0, R)[None, :]
        xa = tl.load(xa_ptr + rows * xa_stride + k, mask=(rows < n_rows) & (k < rank), other=0.0)
        if IEEE:
            t += scale * tl.dot(xa.to(tl.float32), bt, input_precision="ieee")
        else:
            t += scale * tl.dot(xa, bt)
    return t


@triton.jit
def _lora_gated_fwd_kernel(
    g_ptr, u_ptr, h_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, n_rows, n_cols, rank_g, rank_u,
    g_stride, u_stride, h_stride, xg_stride, bg_stride, bg_kstride, xu_stride, bu_stride, bu_kstride,
    scale_g, scale_u, ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, RG: tl.constexpr,
    RU: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, cols, mask = row_tile(n_rows, n_cols, ROWS, BLOCK)
    bt_g = _factor_b(bg_ptr, cols, n_cols, rank_g, bg_stride, bg_kstride, HAS_G, RG, IEEE)
    bt_u = _factor_b(bu_ptr, cols, n_cols, rank_u, bu_stride, bu_kstride, HAS_U, RU, IEEE)
    g = _load_corrected(g_ptr, g_stride, xg_ptr, bt_g, rows, cols, mask, n_rows, rank_g, xg_stride, scale_g,
                        HAS_G, RG, IEEE)
    u = _load_corrected(u_ptr, u_stride, xu_ptr, bt_u, rows, cols, mask, n_rows, rank_u, xu_stride, scale_u,
                        HAS_U, RU, IEEE)
    act, _ = _act_and_grad(g, ACT)
    tl.store(h_ptr + rows * h_stride + cols, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_gated_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, xd_ptr, bd_ptr, n_rows, n_cols,
    rank_g, rank_u, rank_d, dh_stride, g_stride, u_stride, dg_stride, du_stride, h_stride, xg_stride, bg_stride,
    bg_kstride, xu_stride, bu_stride, bu_kstride, xd_stride, bd_stride, bd_kstride, scale_g, scale_u, scale_d,
    ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, HAS_D: tl.constexpr, RG: tl.constexpr,
    RU: tl.constexpr, RD: tl.constexpr, WRITE_H: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # dg/du may alias g/u (in-place backward): each element is read before it is written, by one program.
    rows, cols, mask = row_tile(n_rows, n_cols, ROWS, BLOCK)
    bt_g = _factor_b(bg_ptr, cols, n_cols, rank_g, bg_stride, bg_kstride, HAS_G, RG, IEEE)
    bt_u = _factor_b(bu_ptr, cols, n_cols, rank_u, bu_stride, bu_kstride, HAS_U, RU, IEEE)
    bt_d = _factor_b(bd_ptr, cols, n_cols, rank_d, bd_stride, bd_kstride, HAS_D, RD, IEEE)
    dh = _load_corrected(dh_ptr, dh_stride, xd_ptr, bt_d, rows, cols, mask, n_rows, rank_d, xd_stride, scale_d,
                         HAS_D, RD, IEEE)
    g = _load_corrected(g_ptr, g_stride, xg_ptr, bt_g, rows, cols, mask, n_rows, rank_g, xg_stride, scale_g,
                        HAS_G, RG, IEEE)
    u = _load_corrected(u_ptr, u_stride, xu_ptr, bt_u, rows, cols, mask, n_rows, rank_u, xu_stride, scale_u,
                        HAS_U, RU, IEEE)
    act, grad = _act_and_grad(g, ACT)
    if WRITE_H:  # the forward's output, for the down projection's LoRA grads, without another pass over g/u
        tl.store(h_ptr + rows * h_stride + cols, (act * u).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + rows * dg_stride + cols, (dh * u * grad).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows * du_stride + cols, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)


# (ROWS, BLOCK, num_warps) on the GPU, picked with benchmarks/kernels/bench_lora_gated.py on an H100 at the
# Llama-3.1-8B MLP shape (r=32): 16 x 128 tiles were fastest both ways; longer tiles, or programs that keep
# their B tile over several row tiles, were slower.
GPU_TILE = (16, 128, 4)


def _tile(n_rows: int, n_cols: int, on_gpu: bool) -> tuple[int, int, int]:
    # tl.dot needs every tile side >= 16. The interpreter's cost is per program, so it gets large tiles.
    if on_gpu:
        return GPU_TILE
    block = max(16, min(triton.next_power_of_2(max(n_cols, 1)), 256))
    return max(16, min(triton.next_power_of_2(max(n_rows, 1)), 16384 // block)), block, 4


class _Side(NamedTuple):
    """One low-rank term as kernel arguments: pointers, rank, strides, scale, and the HAS / R constexprs."""

    xa: torch.Tensor
    b: torch.Tensor
    rank: int
    strides: tuple[int, int, int]  # xa's row stride, B's row stride, B's rank stride
    scale: float
    has: bool
    r: int


def _side(low: LowRank | None, like: torch.Tensor) -> _Side:
    if low is None:
        return _Side(like, like, 0, (0, 0, 0), 0.0, False, 16)
    xa, b = low.xa, low.B
    if xa.stride(-1) != 1:
        raise ValueError("lora_gated: xa needs unit column stride")
    rank = xa.shape[1]
    return _Side(xa, b, rank, (xa.stride(0), *b.stride()), float(low.scale), True,
                 max(16, triton.next_power_of_2(rank)))


def _launch(kernel, tensors: tuple, strides: tuple, g, lows: tuple, activation, tile, **constexprs) -> None:
    """``lows``: the gate's and the up's terms, and in backward the down projection's share of ``dh``."""
    n_rows, n_cols = g.shape
    sides = [_side(low, g) for low in lows]
    ieee = g.dtype == torch.float32 or interpreter_on()
    rows, block, warps = tile
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block))
    names = "GUD"[:len(sides)]
    launch(kernel, grid,
           (*tensors, *(t for sd in sides for t in (sd.xa, sd.b)), n_rows, n_cols, *(sd.rank for sd in sides),
            *strides, *(st for sd in sides for st in sd.strides), *(sd.scale for sd in sides)),
           dict(ACT=ACT_CODES[activation], **{f"HAS_{n}": sd.has for n, sd in zip(names, sides)},
                **{f"R{n}": sd.r for n, sd in zip(names, sides)}, **constexprs, IEEE=ieee, ROWS=rows, BLOCK=block),
           num_warps=warps)


def lora_gated_forward(g: torch.Tensor, u: torch.Tensor, low_g: LowRank | None, low_u: LowRank | None,
                       activation: str, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``act(g + low_g) * (u + low_u)`` for 2-D ``g``/``u`` (unit column stride); a new contiguous ``h``.
    ``tile`` (ROWS, BLOCK, num_warps) overrides the default, for benchmarks."""
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if h.numel():
        _launch(_lora_gated_fwd_kernel, (g, u, h), (g.stride(0), u.stride(0), h.stride(0)), g, (low_g, low_u),
                activation, tile or _tile(*g.shape, g.is_cuda))
    return h


def lora_gated_backward(dh, g, u, dg, du, low_g: LowRank | None, low_u: LowRank | None, activation: str,
                        tile: tuple[int, int, int] | None = None, low_dh: LowRank | None = None,
                        h: torch.Tensor | None = None) -> None:
    """Write ``dL/dg`` into ``dg`` and ``dL/du`` into ``du`` (either may alias ``g``/``u``); the upstream
    gradient is ``dh + low_dh`` (``low_dh``: a low-rank share of it not yet added, or None). ``h``, when
    given, also receives the forward's output ``act(g + low_g) * (u + low_u)``."""
    if g.numel():
        out_h = g if h is None else h
        _launch(_lora_gated_bwd_kernel, (dh, g, u, dg, du, out_h),
                (dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), out_h.stride(0)), g,
                (low_g, low_u, low_dh), activation, tile or _tile(*g.shape, g.is_cuda), WRITE_H=h is not None)
