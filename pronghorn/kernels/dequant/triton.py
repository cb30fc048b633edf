"""Triton NF4 dequantization: one program writes BLOCK consecutive output elements, of the whole weight or of
a rectangle of its rows and columns (:func:`dequantize_nf4_part_triton`).

Each element loads its packed byte (neighbours share a byte, served from cache), picks its nibble,
looks it up in the 16-entry NF4 table and multiplies by its block's scale in float32. (A variant that loads
each byte once and interleaves its two nibbles' results was 13-27% slower on an H100:
benchmarks/results/kernels/bench_dequant.md.) Double-quantized
scales are decoded inline (code2 lookup times second-level absmax plus offset) so the whole
dequantization is a single launch. The kernel is compiled without fp fusion: bitsandbytes computes
``code2 * absmax2`` and ``+ offset`` as separate float32 ops, and an FMA would change the last bit.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..compiled_launch import CompiledLaunch, launch


@triton.jit
def round_fp32_to_bf16_grid(x):
    """Round float32 values to the nearest bfloat16 (ties to even), still held as float32.

    The following ``.to(tl.bfloat16)`` is then exact whatever rounding mode the conversion uses: Triton's
    CPU interpreter truncates where the GPU rounds to nearest, and bitsandbytes rounds to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n, base, width, row_stride,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    BLOCK: tl.constexpr, INT64: tl.constexpr, COLUMNS: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    local = pid * BLOCK + tl.arange(0, BLOCK)
    mask = local < n
    # the element's index in the whole weight: its byte, nibble and scale block. Out of a column range, each row of
    # ``width`` output elements starts ``row_stride`` elements after the last.
    e = base + (local // width) * row_stride + local % width if COLUMNS else base + local
    byte = tl.load(packed_ptr + e // 2, mask=mask, other=0).to(tl.int32)
    # even elements live in the high nibble, odd ones in the low nibble
    nib = (byte >> ((1 - (e % 2)) * 4)) & 0xF
    val = tl.load(table_ptr + nib)
    blk = e // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    res = val * scale
    if out_ptr.dtype.element_ty == tl.bfloat16:
        res = round_fp32_to_bf16_grid(res)
    tl.store(out_ptr + local, res.to(out_ptr.dtype.element_ty), mask=mask)


def _block_for(numel: int) -> int:
    # 1024 elements (512 packed bytes) per program keeps loads wide on GPU; tiny weights use less.
    return max(16, min(1024, triton.next_power_of_2(numel)))


class _LaunchPlan(NamedTuple):
    """Everything a launch needs that does not change between calls for one quantized weight."""

    key: tuple
    shape: tuple
    numel: int
    packed_u8: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: torch.Tensor
    blocksize: int
    blocksize2: int
    nested: bool
    block: int
    grid: tuple
    int64: bool
    launches: dict  # output dtype -> CompiledLaunch: only the freshly allocated output changes between calls


def _plan_key(packed: torch.Tensor, quant_state) -> tuple:
    # Moving a weight (or its state) to another device or buffer changes these pointers.
    return (packed.data_ptr(), packed.device, quant_state.absmax.data_ptr())


def _make_plan(packed: torch.Tensor, quant_state, key: tuple) -> _LaunchPlan:
    numel = math.prod(quant_state.shape)
    packed_u8 = packed.reshape(-1).view(torch.uint8).contiguous()
    absmax = quant_state.absmax.reshape(-1).contiguous()
    if quant_state.nested:
        s2 = quant_state.state2
        absmax2 = s2.absmax.reshape(-1).float().contiguous()
        code2 = s2.code.float().contiguous()
        offset = quant_state.offset.float().reshape(1)
        blocksize2 = int(s2.blocksize)
        if blocksize2 <= 0 or blocksize2 & (blocksize2 - 1):
            raise ValueError(f"double-quantization blocksize must be a power of two, got {blocksize2}")
    else:
        absmax2 = code2 = offset = absmax  # unused pointers when NESTED is off
        blocksize2 = 1
    block = _block_for(max(numel, 1))
    return _LaunchPlan(key, tuple(quant_state.shape), numel, packed_u8, absmax, absmax2, code2, offset,
                       int(quant_state.blocksize), blocksize2, bool(quant_state.nested), block,
                       (triton.cdiv(numel, block),), numel >= 2**31, {})


def launch_plan(packed: torch.Tensor, quant_state, validate=None) -> _LaunchPlan:
    """The cached plan for this weight, rebuilt (after ``validate(packed, quant_state)``) when the
    weight or its state moved.

    Training dequantizes every frozen weight three times a step (forward, recompute, backward); at
    batch sizes where the GPU outruns Python, the per-call preparation (casts, views, checks) was a
    measurable share of the step, so it is done once and kept on the quant state.
    """
    key = _plan_key(packed, quant_state)
    plan = getattr(quant_state, "_pronghorn_nf4_plan", None)
    if plan is not None and plan.key == key:
        return plan
    if validate is not None:
        validate(packed, quant_state)
    plan = _make_plan(packed, quant_state, key)
    try:
        quant_state._pronghorn_nf4_plan = plan
    except AttributeError:  # a state object that takes no new attributes: plan again next call
        pass
    return plan


def dequantize_nf4_triton(plan: _LaunchPlan, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Launch the kernel for a plan from :func:`launch_plan`; inputs were validated when it was made."""
    out = torch.empty(plan.shape, dtype=dtype, device=plan.packed_u8.device)
    if plan.numel == 0:
        return out
    kept = plan.launches.get(dtype)
    if kept is None:
        kept = plan.launches[dtype] = CompiledLaunch(
            _nf4_dequant_kernel, plan.grid,
            dict(BLOCKSIZE=plan.blocksize, BLOCKSIZE2=plan.blocksize2, NESTED=plan.nested, BLOCK=plan.block,
                 INT64=plan.int64, COLUMNS=False),
            num_warps=4, enable_fp_fusion=False)
    kept(plan.packed_u8, plan.absmax, table, plan.absmax2, plan.code2, plan.offset, out, plan.numel, 0, 1, 1)
    return out


def dequantize_nf4_part_triton(plan: _LaunchPlan, table: torch.Tensor, rows: slice, cols: slice,
                               out: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` and columns ``cols`` (unit steps, in range) of the plan's 2-D weight into contiguous ``out``."""
    row = plan.shape[1]
    width = cols.stop - cols.start
    n = (rows.stop - rows.start) * width
    if n:
        block = plan.block
        launch(_nf4_dequant_kernel, (triton.cdiv(n, block),),
               (plan.packed_u8, plan.absmax, table, plan.absmax2, plan.code2, plan.offset, out, n,
                rows.start * row + cols.start, width, row),
               dict(BLOCKSIZE=plan.blocksize, BLOCKSIZE2=plan.blocksize2, NESTED=plan.nested, BLOCK=block,
                    INT64=plan.int64, COLUMNS=width != row),
               num_warps=4, enable_fp_fusion=False)
    return out
