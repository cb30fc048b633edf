"""Loss normalisation: the one rule every pronghorn loss and trainer follows.

A training loss is ``sum of per-token losses over this micro-batch's label tokens`` divided by
``the number of label tokens in the whole optimizer step``: every micro-batch of gradient
accumulation (and every process, when the trainer gathers the count), passed in as
``num_items_in_batch`` as Hugging Face's Trainer does. Summing the micro-batch losses then gives
exactly the mean over the accumulated batch, however unevenly tokens fall across micro-batches
(padding, packing, response-only masking). Without ``num_items_in_batch`` the divisor is this
call's own label-token count (a plain mean). A divisor of zero (every label ignored) is taken
as one, so such a batch contributes a loss and gradient of 0 instead of NaN.
"""
from __future__ import annotations

import torch


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels [..., S]`` shifted one position left, the last position ``ignore_index``: the target of
    each position is the next token (Hugging Face's ``ForCausalLMLoss``). Shifting the labels rather than
    the logits or hidden states keeps those free views."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def count_label_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of entries of ``labels`` that are not ``ignore_index`` (an int64 tensor, no sync)."""
    return (labels != ignore_index).sum()


def loss_divisor(num_label_tokens: int | torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The fp32 divisor the rule above prescribes, as a 0-d tensor on ``device``, at least 1."""
    count = num_label_tokens if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, bool) or not isinstance(count, (int, torch.Tensor)):
        raise TypeError(f"label-token count must be an int or a tensor, got {type(count).__name__}")
    if isinstance(count, int) and count < 0:
        raise ValueError(f"label-token count must be >= 0, got {count}")
    if isinstance(count, torch.Tensor) and count.numel() != 1:
        raise ValueError(f"label-token count must hold one number, got a tensor of shape {tuple(count.shape)}")
    count = torch.as_tensor(count, device=device).reshape(()).to(device=device, dtype=torch.float32)
    return count.clamp(min=1.0)


def normalise(loss_sum: torch.Tensor, num_label_tokens: int | torch.Tensor,
              num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """``loss_sum`` (summed over this micro-batch's label tokens) divided per the module rule.

    Args:
        loss_sum: summed per-token loss of this call.
        num_label_tokens: label tokens (labels != ignore_index) in this call.
        num_items_in_batch: label tokens in the whole accumulated batch, or None for a plain mean.
    """
    return loss_sum / loss_divisor(num_label_tokens, num_items_in_batch, loss_sum.device)
