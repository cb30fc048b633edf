"""Plain PyTorch NF4 dequantization, the reference the Triton kernel is tested against.

Layout, as bitsandbytes packs a 4-bit weight (``Params4bit.data``, shape ``[(n + 1) // 2, 1]``):
element ``2i`` of the flattened weight is the HIGH nibble of byte ``i`` and element ``2i + 1`` the
LOW nibble. Element ``e`` belongs to scale block ``e // blocksize``. The value is
``NF4[nibble] * absmax[block]`` computed in float32 and rounded once to the output dtype.

With double quantization (``quant_state.nested``) ``absmax`` itself is 8-bit blockwise quantized:
``absmax[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset`` (float32 multiply, then a
separate float32 add; bitsandbytes runs these as two ops, so no fused multiply-add).
"""
from __future__ import annotations

import math

import torch

# The 16 NormalFloat-4 levels (quantiles of N(0, 1) scaled to [-1, 1]), as float32 values.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_SUPPORTED_OUT = (torch.float32, torch.float16, torch.bfloat16)


def nf4_table(device) -> torch.Tensor:
    """The NF4 lookup table as a float32 tensor on ``device``."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``numel`` 4-bit codes (int64, 0..15) stored in ``packed``, high nibble first."""
    flat = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)
    return codes[:numel]


def absmax_of(quant_state) -> torch.Tensor:
    """The float32 per-block scales of a QuantState, undoing double quantization if present."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    q = quant_state.absmax.reshape(-1).to(torch.int64)
    block2 = torch.arange(q.numel(), device=q.device) // s2.blocksize
    scaled = s2.code.float()[q] * s2.absmax.float().reshape(-1)[block2]
    return scaled + quant_state.offset.float()


def check_quant_state(packed: torch.Tensor, quant_state) -> int:
    """Validate ``quant_state`` against ``packed``; returns the number of weight elements."""
    if getattr(quant_state, "quant_type", None) != "nf4":
        got = getattr(quant_state, "quant_type", None)
        raise ValueError(f"dequantize_nf4 handles quant_type 'nf4' only, got {got!r}; "
                         "use bitsandbytes.functional.dequantize_4bit for fp4")
    blocksize = int(quant_state.blocksize)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"NF4 blocksize must be a power of two of at least 2 (bitsandbytes uses 32 to 4096), "
                         f"got {blocksize}")
    numel = math.prod(quant_state.shape)
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (numel + 1) // 2:
        raise ValueError(f"packed NF4 data holds {nbytes} bytes but quant_state.shape {tuple(quant_state.shape)} "
                         f"needs {(numel + 1) // 2}")
    if quant_state.absmax.numel() != -(-numel // blocksize):
        raise ValueError(f"quant_state.absmax has {quant_state.absmax.numel()} entries, expected "
                         f"{-(-numel // blocksize)} blocks of {blocksize} for {numel} elements")
    return numel


def resolve_out_dtype(quant_state, out_dtype) -> torch.dtype:
    dtype = out_dtype or quant_state.dtype
    if dtype not in _SUPPORTED_OUT:
        raise ValueError(f"NF4 dequantization writes float32, float16 or bfloat16, got {dtype}")
    return dtype


def dequantize_nf4_part_reference(packed: torch.Tensor, quant_state, rows: slice, cols: slice,
                                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``rows`` and columns ``cols`` of the dense 2-D weight, decoding only the rows they span."""
    numel = check_quant_state(packed, quant_state)
    dtype = resolve_out_dtype(quant_state, out_dtype)
    row = numel // quant_state.shape[0]
    first, last = rows.start * row, rows.stop * row
    codes = unpack_nibbles(packed.reshape(-1).view(torch.uint8)[first // 2:(last + 1) // 2], last - first + first % 2)
    values = nf4_table(packed.device)[codes[first % 2:]]
    block = torch.arange(first, last, device=packed.device) // int(quant_state.blocksize)
    out = values * absmax_of(quant_state).reshape(-1)[block]
    return out.to(dtype).reshape(rows.stop - rows.start, row)[:, cols]


def dequantize_nf4_reference(packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of shape ``quant_state.shape`` in ``out_dtype`` (default ``quant_state.dtype``)."""
    numel = check_quant_state(packed, quant_state)
    dtype = resolve_out_dtype(quant_state, out_dtype)
    codes = unpack_nibbles(packed, numel)
    values = nf4_table(packed.device)[codes]
    block = torch.arange(numel, device=packed.device) // int(quant_state.blocksize)
    out = values * absmax_of(quant_state).reshape(-1)[block]
    return out.to(dtype).reshape(tuple(quant_state.shape))
