"""What a fused LoRA projection needs from a layer, independent of PEFT."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LoraParts(NamedTuple):
    """One projection ``y = x W^T + bias + scale * (x A^T) B^T``.

    weight: the frozen base weight ``[out, in]``: a float tensor, or a bitsandbytes ``Params4bit`` /
        ``Int8Params`` (dequantized on the fly in forward and again in backward; a dense copy lives at most from
        a layer's backward recompute to that layer's backward, see :mod:`pronghorn.kernels.dequant.handoff`).
    A: LoRA down-projection ``[r, in]`` or None (plain linear).
    B: LoRA up-projection ``[out, r]`` or None (together with A).
    scale: ``lora_alpha / r`` (or PEFT's ``scaling[adapter]``).
    bias: frozen base bias ``[out]`` or None.
    """

    weight: torch.Tensor
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    scale: float = 1.0
    bias: Optional[torch.Tensor] = None


def as_parts(p) -> LoraParts:
    """Accept a LoraParts, a (weight, A, B, scale[, bias]) tuple, or a bare weight tensor."""
    if isinstance(p, LoraParts):
        parts = p
    elif isinstance(p, torch.Tensor):
        parts = LoraParts(p)
    elif isinstance(p, (tuple, list)) and 1 <= len(p) <= 5:
        parts = LoraParts(*p)
    else:
        raise TypeError("expected LoraParts(weight, A, B, scale, bias), a tuple of those, or a weight tensor; "
                        f"got {type(p).__name__}")
    if (parts.A is None) != (parts.B is None):
        raise ValueError("LoRA A and B must both be given or both be None")
    if parts.weight.requires_grad:
        raise ValueError("the fused LoRA path treats the base weight as frozen, but it requires grad; "
                         "freeze it (weight.requires_grad_(False)) or call the module's own forward")
    if parts.bias is not None and parts.bias.requires_grad:
        raise ValueError("the fused LoRA path treats the base bias as frozen, but it requires grad; "
                         "freeze it or call the module's own forward")
    if parts.A is not None:
        r = parts.A.shape[0]
        if parts.A.dim() != 2 or parts.B.dim() != 2 or parts.B.shape[1] != r:
            raise ValueError(f"LoRA shapes must be A [r, in] and B [out, r], got A {tuple(parts.A.shape)} "
                             f"and B {tuple(parts.B.shape)}")
    return parts
