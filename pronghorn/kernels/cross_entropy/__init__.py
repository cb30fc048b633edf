"""Fused LM head + cross-entropy (chunked, logits never materialised): Triton kernels,
autograd Function, PyTorch reference."""
from pronghorn.kernels.cross_entropy.function import (
    FusedLinearCrossEntropyFunction,
    causal_lm_fused_loss,
    fused_linear_cross_entropy,
    pick_chunk_rows,
    set_default_chunk_rows,
)
from pronghorn.kernels.cross_entropy.reference import (
    cross_entropy_from_logits_reference,
    fused_linear_cross_entropy_reference,
    token_stats_from_logits,
)

__all__ = [
    "FusedLinearCrossEntropyFunction", "causal_lm_fused_loss", "cross_entropy_from_logits_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "pick_chunk_rows",
    "set_default_chunk_rows", "token_stats_from_logits",
]
