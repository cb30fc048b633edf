"""The per-step token metrics TRL's SFTTrainer logs (``entropy``, ``mean_token_accuracy``, ``num_tokens``),
kept when pronghorn's fused LM-head loss means the forward returns no logits.

TRL computes them inside its own ``compute_loss``; pronghorn's trainer takes the loss from the
model's (fused) forward instead, so it records the same three metrics here, from the token
statistics that :func:`pronghorn.nn.lm_head_loss.collect_token_stats` gathered during the forward,
or from the logits where the model's own forward ran (evaluation).
"""
from __future__ import annotations

import logging

import torch

from pronghorn.kernels.cross_entropy import token_stats_from_logits
from pronghorn.training.loss import next_token_labels

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def labels_of(inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(labels, shift_labels)`` of a batch, read before the trainer can pop them."""
    return inputs.get("labels"), inputs.get("shift_labels")


def stats_from_logits(logits: torch.Tensor, labels: torch.Tensor | None,
                      shift_labels: torch.Tensor | None) -> torch.Tensor | None:
    """``[label tokens, top-1 correct, summed entropy]`` of next-token ``logits [B, S, V]`` (already
    softcapped/scaled by the model), or None without labels."""
    if shift_labels is None:
        if labels is None:
            return None
        shift_labels = next_token_labels(labels, IGNORE_INDEX)
    return token_stats_from_logits(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), IGNORE_INDEX)


def _tokens_in_batch(inputs: dict) -> torch.Tensor | None:
    # As TRL counts them: the attention mask, or for padding-free batches the one flat row's length.
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    if "position_ids" in inputs:
        return torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
    return None


def record_token_metrics(trainer, mode: str, inputs: dict, sums: torch.Tensor | None) -> None:
    """Append this micro-batch's ``entropy`` and ``mean_token_accuracy`` (from ``sums``, summed over
    processes) to the trainer's metrics, and update ``num_tokens`` in training, as TRL's trainer does.

    ``sums`` is ``[label tokens, top-1 correct, summed entropy]``, or None when neither the fused loss
    nor the logits gave any; then the two metrics are left out and the trainer says so once.
    """
    metrics = getattr(trainer, "_metrics", None)
    if metrics is None:
        # A TRL release without the metrics store this mirrors: nothing to append to.
        if not getattr(trainer, "_pronghorn_token_metrics_warned", False):
            logger.warning("pronghorn SFTTrainer: this TRL version has no SFTTrainer._metrics, so entropy, "
                           "mean_token_accuracy and num_tokens are not logged")
            trainer._pronghorn_token_metrics_warned = True
        return
    if sums is not None:
        tokens, correct, entropy = trainer.accelerator.reduce(sums.detach().float(), reduction="sum").tolist()
        metrics[mode]["entropy"].append(entropy / tokens if tokens > 0 else 0.0)
        metrics[mode]["mean_token_accuracy"].append(correct / tokens if tokens > 0 else 0.0)
    elif not getattr(trainer, "_pronghorn_token_metrics_warned", False):
        logger.warning("pronghorn SFTTrainer: the model's forward gave neither token statistics (pronghorn's LM-head "
                       "loss) nor logits, so entropy and mean_token_accuracy are not logged for it")
        trainer._pronghorn_token_metrics_warned = True
    if mode == "train":
        count = _tokens_in_batch(inputs)
        if count is not None:
            total = trainer.accelerator.reduce(count.reshape(1), reduction="sum").item()
            trainer._total_train_tokens = getattr(trainer, "_total_train_tokens", 0) + int(total) // getattr(
                trainer, "_tp_size", 1)
    metrics[mode]["num_tokens"] = [getattr(trainer, "_total_train_tokens", 0)]
