"""Dense views of frozen base weights: plain, bitsandbytes NF4/FP4 (Params4bit) or int8 (Int8Params).

bitsandbytes is never imported here at module import; a quantized weight is recognised by the state it
carries (``quant_state`` for 4-bit, ``SCB`` for int8), so plain-PyTorch users never load it.
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import torch
from torch import nn

from .function import dequantize_nf4, dequantize_nf4_group

# bitsandbytes' int8 row scales map to [-127, 127]; it multiplies by this reciprocal rather than dividing.
_INV_127 = 7.874015718698502e-3


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit or int8 parameter that must be dequantized to use."""
    return _four_bit_state(weight) is not None or _int8_scales(weight) is not None


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
    """
    state = _four_bit_state(weight)
    if state is not None:
        if state.quant_type == "nf4":
            # bitsandbytes' matmul dequantizes to quant_state.dtype then casts; do the same where the two
            # roundings could differ (a 16-bit state read as another 16-bit dtype) so results match bit for bit.
            if dtype == state.dtype or state.dtype == torch.float32:
                return dequantize_nf4(weight.data, state, dtype)
            return dequantize_nf4(weight.data, state, state.dtype).to(dtype)
        import bitsandbytes.functional as bnb_f  # a 4-bit state exists, so bitsandbytes is installed

        return bnb_f.dequantize_4bit(weight.data, state).to(dtype)
    scb = _int8_scales(weight)
    if scb is not None:
        return (weight.data.float() * scb.float().reshape(-1, 1) * _INV_127).to(dtype)
    if not weight.is_floating_point():
        raise TypeError(f"cannot make a dense weight from a {weight.dtype} tensor without quantization state "
                        "(expected a float tensor, a bitsandbytes Params4bit with quant_state, or Int8Params with SCB)")
    return weight if weight.dtype == dtype else weight.to(dtype)


# Dequantizing the weights of one input together keeps their dense copies alive together: q/k/v of an 8B
# model take 48 MiB so, gate/up 224 MiB where one at a time peaked at 112 MiB. Groups above this size are
# dequantized one weight at a time.
GROUP_MAX_BYTES = int(float(os.environ.get("PRONGHORN_DEQUANT_GROUP_MAX_MB", "64")) * 2**20)


def dense_weights(weights: list[torch.Tensor], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Each weight as :func:`dense_weight` gives it, in order. NF4 weights of one column count (q/k/v,
    gate/up) up to :data:`GROUP_MAX_BYTES` together are dequantized in one launch and handed out as row
    blocks of one buffer: launches cost host time that QLoRA steps are short of. Otherwise each weight is
    made when asked for, so a caller that drops it before asking for the next holds one at a time."""
    blocks = _dequantize_together(weights, dtype) if 2 <= len(weights) <= 3 else None
    if blocks is not None:
        yield from blocks
        return
    for weight in weights:
        yield dense_weight(weight, dtype)


def _dequantize_together(weights, dtype) -> list[torch.Tensor] | None:
    states = [_four_bit_state(w) for w in weights]
    if any(s is None or s.quant_type != "nf4" or (s.dtype != dtype and s.dtype != torch.float32) for s in states):
        return None  # not all NF4, or a 16-bit state read as another dtype (dense_weight rounds twice there)
    if sum(math.prod(s.shape) for s in states) * dtype.itemsize > GROUP_MAX_BYTES:
        return None
    together = dequantize_nf4_group([(w.data, s) for w, s in zip(weights, states)], dtype)
    return None if together is None else together.split([s.shape[0] for s in states])


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
        return (weight.data.float() * scb.float().reshape(-1, 1) * _INV_127).to(dtype)
    return dense_weight(weight, dtype)
