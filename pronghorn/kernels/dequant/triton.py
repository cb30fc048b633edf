"""Triton NF4 dequantization: one program writes BLOCK consecutive output elements.

Each element loads its packed byte (neighbours share a byte, served from cache), picks its nibble,
looks it up in the 16-entry NF4 table and multiplies by its block's scale in float32. Double-quantized
scales are decoded inline (code2 lookup times second-level absmax plus offset) so the whole
dequantization is a single launch. The kernel is compiled without fp fusion: bitsandbytes computes
``code2 * absmax2`` and ``+ offset`` as separate float32 ops, and an FMA would change the last bit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import needs_int64


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
    packed_ptr, absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    BLOCK: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
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
    tl.store(out_ptr + e, res.to(out_ptr.dtype.element_ty), mask=mask)


def _block_for(numel: int) -> int:
    # 1024 elements (512 packed bytes) per program keeps loads wide on GPU; tiny weights use less.
    return max(16, min(1024, triton.next_power_of_2(numel)))


def dequantize_nf4_triton(packed: torch.Tensor, quant_state, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Launch the kernel; inputs are validated by the caller."""
    numel = math.prod(quant_state.shape)
    out = torch.empty(tuple(quant_state.shape), dtype=dtype, device=packed.device)
    if numel == 0:
        return out
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
    block = _block_for(numel)
    grid = (triton.cdiv(numel, block),)
    _nf4_dequant_kernel[grid](
        packed_u8, absmax, table, absmax2, code2, offset, out, numel,
        BLOCKSIZE=int(quant_state.blocksize), BLOCKSIZE2=blocksize2, NESTED=bool(quant_state.nested),
        BLOCK=block, INT64=needs_int64(out), num_warps=4, enable_fp_fusion=False,
    )
    return out
