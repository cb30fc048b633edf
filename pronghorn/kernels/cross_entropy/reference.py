"""Plain PyTorch cross-entropy over LM-head logits: the math the fused kernel must reproduce.

These materialise the full [N, V] logits (in fp32), which is exactly what the fused kernel avoids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pronghorn.training.loss import count_label_tokens, normalise

REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r} (per-token losses are not "
                         f"supported because the fused kernel folds the gradient into its forward pass)")


def transform_logits(logits: torch.Tensor, softcap: float | None = None, logit_scale: float = 1.0) -> torch.Tensor:
    """fp32 logits after ``logit_scale`` and then the optional ``softcap * tanh(z / softcap)``."""
    z = logits.float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def cross_entropy_from_logits_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, softcap: float | None = None,
    logit_scale: float = 1.0, num_items_in_batch: int | torch.Tensor | None = None, reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits [N, V]`` against ``labels [N]`` in fp32, normalised per
    :mod:`pronghorn.training.loss` (``"sum"``: summed over label tokens)."""
    check_reduction(reduction)
    z = transform_logits(logits, softcap, logit_scale)
    labels = labels.to(device=z.device, dtype=torch.long)
    loss_sum = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss_sum
    return normalise(loss_sum, count_label_tokens(labels, ignore_index), num_items_in_batch)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, softcap: float | None = None, logit_scale: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None, reduction: str = "mean", chunk_size: int | None = None,
) -> torch.Tensor:
    """LM head then cross-entropy, unfused: ``logits = hidden @ weight.T (+ bias)`` in the input dtype
    (as ``nn.Linear`` computes it), then :func:`cross_entropy_from_logits_reference`.
    ``chunk_size`` is accepted for signature parity and ignored."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy_from_logits_reference(
        logits, labels, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
        num_items_in_batch=num_items_in_batch, reduction=reduction,
    )
