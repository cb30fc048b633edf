"""Plain PyTorch rotary position embedding with Hugging Face's ``apply_rotary_pos_emb`` semantics.

``cos``/``sin`` are what a Hugging Face rotary-embedding module returns (``[batch or 1, seq, rotary_dim]``),
so every scaling variant and any ``position_ids`` are already folded into them. ``rotary_dim`` is
``cos.shape[-1]``; when it is smaller than the head dim the remaining features pass through unchanged
(Phi-3, GPT-NeoX style partial rotary). ``interleaved=False`` pairs feature ``j`` with ``j + rotary_dim/2``
(Llama's ``rotate_half``); ``interleaved=True`` pairs ``2j`` with ``2j + 1`` (Cohere, GPT-J).
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``(-x2, x1)`` for the two halves of the last dim (or for even/odd features when interleaved)."""
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k``: ``x * cos + rotate_half(x) * sin`` on the first ``rotary_dim`` features.

    Args:
        q: ``[batch, q_heads, seq, head_dim]`` (or ``[batch, seq, q_heads, head_dim]`` with ``unsqueeze_dim=2``).
        k: the same layout with ``kv_heads``.
        cos, sin: ``[batch or 1, seq, rotary_dim]``.
        unsqueeze_dim: where to insert the heads axis into ``cos``/``sin`` to broadcast against q/k.
        interleaved: pair adjacent features instead of the two halves.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if rotary_dim == x.shape[-1]:
            return x * cos + rotate_half(x, interleaved) * sin
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((x_rot * cos + rotate_half(x_rot, interleaved) * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)
