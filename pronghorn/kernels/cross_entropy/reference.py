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


# Rows per step of token_stats_from_logits: bounds its fp32 temporaries whatever the batch size.
_STATS_ROWS = 4096


def check_token_stats_out(token_stats_out: torch.Tensor | None, device: torch.device) -> None:
    """Raise unless ``token_stats_out`` is None or an fp32 tensor of shape [3] on ``device``."""
    if token_stats_out is None:
        return
    if token_stats_out.shape != (3,) or token_stats_out.dtype != torch.float32 or token_stats_out.device != device:
        raise ValueError(f"token_stats_out must be a float32 tensor of shape [3] on {device} (label tokens, "
                         f"top-1 correct, summed entropy), got {token_stats_out.dtype} {tuple(token_stats_out.shape)} "
                         f"on {token_stats_out.device}")


@torch.no_grad()
def token_stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                            softcap: float | None = None, logit_scale: float = 1.0) -> torch.Tensor:
    """Training-log statistics of ``logits [N, V]`` against ``labels [N]``, over rows whose label is not ignored.

    Returns an fp32 tensor ``[label tokens, label tokens whose label is the argmax, summed entropy (nats)]``
    of the distribution ``softmax(y)``, ``y`` the logits after ``logit_scale`` and ``softcap`` (the ones the
    loss sees). Ties go to the lowest index, as ``torch.argmax``. Works through the rows in slices, so its
    fp32 temporaries stay small next to the logits themselves.
    """
    labels = labels.to(device=logits.device, dtype=torch.long)
    out = torch.zeros(3, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], _STATS_ROWS):
        lab = labels[start:start + _STATS_ROWS]
        valid = lab != ignore_index
        z = transform_logits(logits[start:start + _STATS_ROWS], softcap, logit_scale)
        logp = torch.log_softmax(z, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        out[0] += valid.sum()
        out[1] += (valid & (z.argmax(-1) == lab)).sum()
        out[2] += entropy[valid].sum()
    return out


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
    token_stats_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LM head then cross-entropy, unfused: ``logits = hidden @ weight.T (+ bias)`` in the input dtype
    (as ``nn.Linear`` computes it), then :func:`cross_entropy_from_logits_reference`.
    ``chunk_size`` is accepted for signature parity and ignored; ``token_stats_out`` (fp32 ``[3]``)
    receives :func:`token_stats_from_logits`, added in place."""
    check_token_stats_out(token_stats_out, hidden.device)
    logits = F.linear(hidden, weight, bias)
    if token_stats_out is not None:
        token_stats_out += token_stats_from_logits(logits, labels, ignore_index, softcap, logit_scale)
    return cross_entropy_from_logits_reference(
        logits, labels, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
        num_items_in_batch=num_items_in_batch, reduction=reduction,
    )
