"""Drop-in replacements for Hugging Face's ``apply_rotary_pos_emb`` functions, running the RoPE kernel.

The wiring layer swaps these for the module-level function of a ``modeling_*`` module (and puts the
original back to undo it). ``cos``/``sin`` still come from the model's own rotary-embedding module,
so every rope scaling type and any ``position_ids`` (packed sequences) are handled as in
transformers. The rotary width is ``cos.shape[-1]``, which also covers partial rotary (Phi-3, ...).
"""
from __future__ import annotations

import torch

from pronghorn.kernels.rope import apply_rope


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``transformers.models.llama.modeling_llama.apply_rotary_pos_emb`` (and Phi-3's).

    Args:
        q: ``[batch, heads, seq, head_dim]`` queries (``[batch, seq, heads, head_dim]`` with ``unsqueeze_dim=2``).
        k: keys in the same layout.
        cos, sin: the rotary module's outputs, ``[batch or 1, seq, rotary_dim]``.
        unsqueeze_dim: heads axis of q/k.

    Returns new tensors (inputs untouched). The backward writes the input gradients into the
    incoming gradient buffers: inside an attention layer those come fresh from the attention
    backward and are read by nothing else.
    """
    return apply_rope(q, k, cos, sin, unsqueeze_dim, inplace_backward=True)


def apply_rotary_pos_emb_interleaved(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as Cohere's ``apply_rotary_pos_emb``: adjacent features paired, result in q's dtype.

    Args as :func:`apply_rotary_pos_emb`; ``cos``/``sin`` use the repeat-interleaved layout.
    """
    q_out, k_out = apply_rope(q, k, cos, sin, unsqueeze_dim, interleaved=True, inplace_backward=True)
    return q_out.to(q.dtype), k_out.to(k.dtype)
