"""Dense views of frozen base weights: plain, bitsandbytes NF4/FP4 (Params4bit) or int8 (Int8Params).

bitsandbytes is never imported here at module import; a quantized weight is recognised by the state it
carries (``quant_state`` for 4-bit, ``SCB`` for int8), so plain-PyTorch users never load it.
"""
from __future__ import annotations

import torch
from torch import nn

from . import handoff
from .function import dequantize_nf4, dequantize_nf4_part

# bitsandbytes' int8 row scales map to [-127, 127]; it multiplies by this reciprocal rather than dividing.
_INV_127 = 7.874015718698502e-3


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit or int8 parameter that must be dequantized to use."""
    return _four_bit_state(weight) is not None or _int8_scales(weight) is not None


def is_4bit(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit (NF4 or FP4) parameter."""
    return _four_bit_state(weight) is not None


def _four_bit_state(weight):
    state = getattr(weight, "quant_state", None)
    # A Params4bit that has not been moved to a device yet still holds its float data and no state.
    return state if state is not None and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32) else None


def _int8_scales(weight):
    scb = getattr(weight, "SCB", None)
    return scb if scb is not None and weight.dtype == torch.int8 else None


def weight_rows(weight: torch.Tensor) -> int:
    """Output features of a base weight ``[out, in]`` without dequantizing it (4-bit storage is packed)."""
    state = _four_bit_state(weight)
    return state.shape[0] if state is not None else weight.shape[0]


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense ``dtype`` tensor, dequantizing bitsandbytes 4-bit or int8 storage.

    Args:
        weight: an ``nn.Linear``'s weight: a float tensor, a ``Params4bit`` (NF4 goes through
            :func:`dequantize_nf4`; FP4 through bitsandbytes) or an ``Int8Params`` with ``SCB`` scales.
        dtype: the dtype to return. A float weight already in ``dtype`` is returned as is (no copy).

    Inside a layer's recompute-to-backward handoff (:mod:`.handoff`) a quantized weight is dequantized once
    for the recompute and its backward.
    """
    if not is_quantized(weight):
        if not weight.is_floating_point():
            raise TypeError(f"cannot make a dense weight from a {weight.dtype} tensor without quantization state "
                            "(expected a float tensor, a bitsandbytes Params4bit with quant_state, or Int8Params "
                            "with SCB)")
        return weight if weight.dtype == dtype else weight.to(dtype)
    dense = handoff.take(weight, dtype)  # made by this layer's backward recompute (see handoff)
    if dense is None:
        dense = _dequantize(weight, dtype)
        handoff.offer(weight, dtype, dense)
    return dense


def dense_part(weight: torch.Tensor, dtype: torch.dtype, rows: slice, cols: slice | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``dense_weight(weight, dtype)[rows, cols]`` of a 2-D weight, bit for bit, without making the rest dense: an
    NF4 weight decodes only that part, and a float weight already in ``dtype`` gives a view (``out`` None) or
    is copied into ``out``. No handoff copy is taken or kept."""
    cols = slice(None) if cols is None else cols
    state = _four_bit_state(weight)
    if state is not None and state.quant_type == "nf4":
        decoded = _nf4_decode_dtype(state, dtype)
        if decoded == dtype:
            return dequantize_nf4_part(weight.data, state, rows, cols, dtype, out)
        part = dequantize_nf4_part(weight.data, state, rows, cols, decoded)
    else:
        part = (_dequantize(weight, dtype) if is_quantized(weight) else weight)[rows, cols]
    if out is not None:
        return out.copy_(part)
    return part if part.dtype == dtype else part.to(dtype)


def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    state = _four_bit_state(weight)
    if state is not None:
        if state.quant_type == "nf4":
            return dequantize_nf4(weight.data, state, _nf4_decode_dtype(state, dtype)).to(dtype)
        import bitsandbytes.functional as bnb_f  # a 4-bit state exists, so bitsandbytes is installed

        return bnb_f.dequantize_4bit(weight.data, state).to(dtype)
    return _int8_dense(weight.data, _int8_scales(weight), dtype)


def _nf4_decode_dtype(state, dtype: torch.dtype) -> torch.dtype:
    """The dtype to decode an NF4 weight into before casting to ``dtype``. bitsandbytes' matmul dequantizes to
    ``quant_state.dtype`` then casts; we do the same where the two roundings could differ (a 16-bit state read as
    another 16-bit dtype), so results match bit for bit."""
    return dtype if dtype == state.dtype or state.dtype == torch.float32 else state.dtype


def _int8_dense(data: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes int8 rows times their absmax scales ``scb``, in ``dtype``."""
    return (data.float() * scb.float().reshape(-1, 1) * _INV_127).to(dtype)


def weight_of(base_layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out_features, in_features]`` weight of a linear layer, in ``dtype``.

    Args:
        base_layer: an ``nn.Linear``, a bitsandbytes ``Linear4bit`` (dequantized) or ``Linear8bitLt``
            (dequantized with its ``SCB`` row scales). A PEFT LoRA layer is not accepted: pass its
            ``base_layer``.
        dtype: output dtype.
    """
    if not isinstance(base_layer, nn.Linear):
        hint = " (a PEFT LoRA layer: pass module.base_layer)" if hasattr(base_layer, "base_layer") else ""
        raise TypeError(f"weight_of expects an nn.Linear or a bitsandbytes Linear4bit/Linear8bitLt, "
                        f"got {type(base_layer).__name__}{hint}")
    weight = base_layer.weight
    if weight.dtype == torch.int8 and getattr(weight, "SCB", None) is None:
        state = getattr(base_layer, "state", None)
        scb = getattr(state, "SCB", None)
        if scb is None:
            raise ValueError("Linear8bitLt weight is int8 but neither weight.SCB nor state.SCB holds its scales")
        return _int8_dense(weight.data, scb, dtype)
    return dense_weight(weight, dtype)
