"""NF4 dequantization entry point: Triton where it can run, the PyTorch reference elsewhere."""
from __future__ import annotations

import torch

from ..backend import use_triton
from .reference import (
    check_quant_state, dequantize_nf4_reference, dequantize_nf4_part_reference, nf4_table, resolve_out_dtype,
)

_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    # Built on first use per device (never at import), then reused to avoid a host-to-device copy per call.
    if device not in _TABLES:
        _TABLES[device] = nf4_table(device)
    return _TABLES[device]


def dequantize_nf4(packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes NF4 weight, bit-exactly as ``bitsandbytes.functional.dequantize_4bit``.

    Args:
        packed: the packed 4-bit data (``Params4bit.data``: ``uint8`` or any ``quant_storage`` dtype,
            ``(numel + 1) // 2`` bytes, two codes per byte, high nibble first).
        quant_state: its ``bitsandbytes.functional.QuantState`` (absmax, blocksize, shape, dtype, and for
            double quantization ``nested``/``state2``/``offset``). Must have ``quant_type == "nf4"``.
        out_dtype: float32, float16 or bfloat16; defaults to ``quant_state.dtype``.

    Returns:
        A new dense tensor of shape ``quant_state.shape``.
    """
    dtype = resolve_out_dtype(quant_state, out_dtype)
    if use_triton(packed, quant_state.absmax):
        from .triton import dequantize_nf4_triton, launch_plan  # triton imported only when a kernel will run

        plan = launch_plan(packed, quant_state, validate=check_quant_state)
        return dequantize_nf4_triton(plan, _table(packed.device), dtype)
    return dequantize_nf4_reference(packed, quant_state, dtype)


def dequantize_nf4_part(packed: torch.Tensor, quant_state, rows: slice, cols: slice | None = None,
                        out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_nf4(packed, quant_state)[rows, cols]`` of a 2-D weight, decoding only that part, bit for bit.

    Args:
        packed, quant_state, out_dtype: as for :func:`dequantize_nf4`; ``quant_state.shape`` must be 2-D.
        rows, cols: ranges with unit steps inside the weight's shape (``cols`` None: every column).
        out: where to write the part: a contiguous tensor of ``out_dtype`` and the part's shape (a new one if None).
    """
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"dequantize_nf4_part takes a 2-D weight, quant_state.shape is {shape}")
    rows, cols = _span(rows, shape[0], "row"), _span(slice(None) if cols is None else cols, shape[1], "column")
    dtype = resolve_out_dtype(quant_state, out_dtype)
    want = (rows.stop - rows.start, cols.stop - cols.start)
    if out is None:
        out = torch.empty(want, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != want or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {want}, got a "
                         f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} tensor of shape "
                         f"{tuple(out.shape)}")
    if use_triton(packed, quant_state.absmax):
        from .triton import dequantize_nf4_part_triton, launch_plan

        plan = launch_plan(packed, quant_state, validate=check_quant_state)
        return dequantize_nf4_part_triton(plan, _table(packed.device), rows, cols, out)
    return out.copy_(dequantize_nf4_part_reference(packed, quant_state, rows, cols, dtype))


def _span(part: slice, size: int, name: str) -> slice:
    """``part`` with its open ends filled in, checked to be a unit-step range within ``size``."""
    start = 0 if part.start is None else part.start
    stop = size if part.stop is None else part.stop
    if part.step not in (None, 1) or not 0 <= start <= stop <= size:
        raise ValueError(f"{name} range {part.start}:{part.stop}:{part.step} must have unit steps and lie within "
                         f"the weight's {size} {name}s")
    return slice(start, stop)
