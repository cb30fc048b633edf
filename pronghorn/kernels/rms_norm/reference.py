"""Plain PyTorch RMSNorm, written to match Hugging Face's modules operation for operation.

``cast_mode="llama"`` is LlamaRMSNorm (also Qwen2, Mistral, Phi-3, ...): normalise in fp32, cast the
normalised activations back to the input dtype, then multiply by the weight in the weight's dtype.
``cast_mode="gemma"`` is GemmaRMSNorm: normalise and multiply in fp32, cast the product at the end.
"""
from __future__ import annotations

import torch

CAST_MODES = ("llama", "gemma")


def check_cast_mode(cast_mode: str) -> None:
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode must be one of {CAST_MODES}, got {cast_mode!r}")


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, cast_mode: str = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * (offset + weight)``.

    Args:
        x: input of shape ``[..., hidden]``.
        weight: ``[hidden]``.
        eps: added to the mean square before the square root.
        offset: 0 for Llama-style weights, 1 for Gemma-style ``(1 + weight)``.
        cast_mode: ``"llama"`` or ``"gemma"`` (see the module docstring).
    """
    check_cast_mode(cast_mode)
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast_mode == "llama":
        return (offset + weight) * normed.to(x.dtype)
    return (normed * (offset + weight.to(torch.float32))).to(x.dtype)


def rms_norm_output_dtype(x: torch.Tensor, weight: torch.Tensor, cast_mode: str) -> torch.dtype:
    """The dtype the reference returns: Llama promotes input with weight, Gemma keeps the input's."""
    if cast_mode == "llama":
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype
