"""Gated activation with LoRA corrections folded in: ``h = act(g + s_g xa_g B_g^T) * (u + s_u xa_u B_u^T)``.

Used by the fused LoRA MLP (:mod:`pronghorn.kernels.lora.mlp`, which is its autograd wrapper): the
gate/up GEMMs produce only the base outputs, and the rank-r LoRA terms are added inside the activation
kernel instead of by a separate ``addmm_`` that reads and writes the whole ``[N, I]`` output again.
"""
from pronghorn.kernels.lora_gated.reference import LowRank, lora_gated_backward_reference, lora_gated_reference

__all__ = ["LowRank", "lora_gated_backward_reference", "lora_gated_reference"]
