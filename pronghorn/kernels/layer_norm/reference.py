"""Plain PyTorch LayerNorm: statistics and affine in fp32, output in the input's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: ``[..., hidden]``.
        weight: ``[hidden]`` or None (no scale).
        bias: ``[hidden]`` or None (no shift).
        eps: added to the biased variance.
    """
    n = x.shape[-1]
    w = weight.to(torch.float32) if weight is not None else None
    b = bias.to(torch.float32) if bias is not None else None
    return F.layer_norm(x.to(torch.float32), (n,), w, b, eps).to(x.dtype)
