"""Bidirectional varlen attention for vision towers that pack every image (or window) into one stream.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers hold all patches of a batch in one sequence with
``cu_seqlens`` boundaries (per image, and per 112-px window in Qwen2.5-VL's windowed layers). Under any
implementation whose name lacks "flash", transformers splits that stream and calls attention once per
block: a few images of 448-1024 px make hundreds of windows, so each layer launches hundreds of tiny
kernels (forward, checkpoint recompute and backward) and syncs the host for the split sizes. Under a
"flash" implementation it passes ``cu_seq_lens_q/k`` to one call instead; :data:`VISION_VARLEN` is such an
implementation, backed by PyTorch's own varlen flash kernel (no flash-attn package needed), with one
sdpa call per block where that kernel cannot run (CPU, fp32, dropout) — the same math as transformers' split.

transformers only accepts the names of packages and hub kernels as "flash" implementations through
``set_attn_implementation`` (it tries to import them), so :func:`route_vision_attention` sets the vision
sub-config's implementation attribute directly, after registering the function under that name.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from pronghorn.nn.attention import sdpa_backend_policy, varlen_flash_kernel

__all__ = ["VISION_VARLEN", "route_vision_attention", "vision_varlen_attention"]

# "flash" in the name is what sends transformers' vision towers down their cu_seqlens path.
VISION_VARLEN = "pronghorn_flash_vision_varlen"


def vision_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over ``[1, heads, tokens, dim]`` within each ``cu_seq_lens_q`` block (bidirectional unless
    ``is_causal``); returns ``([1, tokens, heads, dim], None)`` like transformers' attention functions."""
    if cu_seq_lens_q is None:
        # Called without block boundaries (a tower that has no packed path): one masked sdpa call.
        with sdpa_backend_policy(query):
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                 scale=scaling, is_causal=is_causal and attention_mask is None)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError(f"{VISION_VARLEN} expects one packed stream [1, heads, tokens, dim], got {tuple(query.shape)}")
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    kernel = varlen_flash_kernel()
    if kernel is not None and query.is_cuda and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16):
        varlen_attn, has_window, _ = kernel
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
        kw = {"window_size": (-1, 0) if is_causal else (-1, -1)} if has_window else {"is_causal": is_causal}
        max_q = int(max_length_q) if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        max_k = int(max_length_k) if max_length_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        out = varlen_attn(q, k, v, cu_seq_lens_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scale=scaling,
                          **kw)
        return out.unsqueeze(0), None
    bounds_q, bounds_k = cu_seq_lens_q.tolist(), cu_k.tolist()
    pieces = []
    for (q0, q1), (k0, k1) in zip(pairwise(bounds_q), pairwise(bounds_k)):
        q, k, v = query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1]
        with sdpa_backend_policy(q):
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                         is_causal=is_causal))
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


def route_vision_attention(vision_config) -> str | None:
    """Send a packed vision tower (its sub-config ``vision_config``) through :data:`VISION_VARLEN`, unless its
    implementation was chosen as something other than sdpa; returns the implementation it had before."""
    from transformers import AttentionInterface

    from pronghorn.nn.attention import POLICY_SDPA

    previous = vision_config._attn_implementation
    if previous not in (None, "sdpa", POLICY_SDPA):
        return previous
    AttentionInterface.register(VISION_VARLEN, vision_varlen_attention)
    vision_config._attn_implementation_internal = VISION_VARLEN
    return previous
