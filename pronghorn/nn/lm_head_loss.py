"""Causal-LM loss straight from the final hidden states, with the fused LM-head cross-entropy.

A Hugging Face CausalLM computes ``logits = lm_head(hidden)`` (then maybe scales/softcaps them)
and ``loss = ForCausalLMLoss(logits, labels, ...)``. :func:`lm_head_loss` returns the same loss
without the [tokens, vocab] logits; the model quirks are a small :class:`LMHeadLossSpec`.

Without logits a trainer cannot derive the token accuracy and entropy it logs, so inside
:func:`collect_token_stats` every :func:`lm_head_loss` call also measures them (in the kernel's
first pass over each logits chunk) and adds them to the collector. Outside it nothing extra runs.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from pronghorn.kernels.cross_entropy import (
    causal_lm_fused_loss,
    cross_entropy_from_logits_reference,
    token_stats_from_logits,
)
from pronghorn.training.loss import next_token_labels


@dataclass(frozen=True)
class LMHeadLossSpec:
    """How a model turns LM-head outputs into logits: ``softcap * tanh(logit_scale * a / softcap)``.

    Attributes:
        softcap: Gemma-2/3 ``final_logit_softcapping``, or None.
        logit_scale: multiplier applied before the softcap (Cohere ``logit_scale``,
            Granite ``1 / logits_scaling``).
    """

    softcap: float | None = None
    logit_scale: float = 1.0


class TokenStats:
    """Sums over the label tokens of every :func:`lm_head_loss` call made inside :func:`collect_token_stats`.

    ``sums`` is None until a call adds to it, then an fp32 tensor ``[label tokens, label tokens whose
    label is the argmax of the logits, summed entropy of the next-token distribution (nats)]``, on the
    device of the first call (no host sync until the caller reads it).
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, sums: torch.Tensor) -> None:
        """Add one call's ``[tokens, correct, entropy]`` sums."""
        sums = sums.detach().float()
        self.sums = sums.clone() if self.sums is None else self.sums + sums.to(self.sums.device)


_ACTIVE_TOKEN_STATS: ContextVar[TokenStats | None] = ContextVar("pronghorn_token_stats", default=None)


@contextmanager
def collect_token_stats() -> Iterator[TokenStats]:
    """Collect token accuracy and entropy from every :func:`lm_head_loss` call in this block.

    Yields a :class:`TokenStats` that those calls add to. Trainers wrap one forward in it to log
    ``mean_token_accuracy`` and ``entropy`` although the fused loss never builds the logits. Blocks nest:
    the innermost one collects.
    """
    stats = TokenStats()
    token = _ACTIVE_TOKEN_STATS.set(stats)
    try:
        yield stats
    finally:
        _ACTIVE_TOKEN_STATS.reset(token)


def lm_head_spec_from_config(config) -> LMHeadLossSpec:
    """Read the logit quirks from a Hugging Face config (its text config for multimodal ones)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    return LMHeadLossSpec(softcap=float(softcap) if softcap else None, logit_scale=scale)


def _fusable(lm_head: nn.Module) -> bool:
    """A plain linear layer we can read the weight of; anything wrapped (LoRA, quantised,
    hooked) must run its own forward."""
    weight = getattr(lm_head, "weight", None)
    return (isinstance(lm_head, nn.Linear) and not hasattr(lm_head, "base_layer")
            and isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and weight.device.type != "meta"
            and not lm_head._forward_hooks and not lm_head._forward_pre_hooks)


def lm_head_loss(
    hidden_states: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None, *, num_items_in_batch: int | torch.Tensor | None = None,
    spec: LMHeadLossSpec | None = None, ignore_index: int = -100, chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token loss of a CausalLM from its final hidden states ``[B, S, H]``.

    Args:
        hidden_states: output of the model's final norm, ``[B, S, H]``.
        lm_head: the model's output layer (``model.get_output_embeddings()``).
        labels: unshifted ``[B, S]`` labels, or ``shift_labels``: already shifted (give one).
        num_items_in_batch: label tokens in the whole accumulated batch, as the HF Trainer passes.
        spec: logit quirks (see :func:`lm_head_spec_from_config`); default none.
        ignore_index, chunk_size: as in :func:`pronghorn.kernels.cross_entropy.fused_linear_cross_entropy`.

    A plain ``nn.Linear`` head takes the fused kernel. Any other head (LoRA-wrapped, quantised,
    hooked) runs its own forward and the loss is taken from the materialised logits with the
    same math, so the result does not depend on which path ran. Inside :func:`collect_token_stats`
    either path also adds this call's token statistics to the collector.
    """
    spec = spec or LMHeadLossSpec()
    collector = _ACTIVE_TOKEN_STATS.get()
    if _fusable(lm_head):
        weight = lm_head.weight
        stats_out = None if collector is None else torch.zeros(3, dtype=torch.float32, device=weight.device)
        loss = causal_lm_fused_loss(
            hidden_states.to(weight.device), weight, labels, shift_labels, lm_head_bias=lm_head.bias,
            ignore_index=ignore_index, softcap=spec.softcap, logit_scale=spec.logit_scale,
            num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, token_stats_out=stats_out,
        )
        if collector is not None:
            collector.add(stats_out)
        return loss
    if (labels is None) == (shift_labels is None):
        raise ValueError("lm_head_loss: pass exactly one of labels (unshifted) and shift_labels (shifted)")
    logits = lm_head(hidden_states)
    if shift_labels is None:
        shift_labels = next_token_labels(labels, ignore_index)
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1).to(logits.device)
    if collector is not None:
        collector.add(token_stats_from_logits(flat_logits, flat_labels, ignore_index, spec.softcap, spec.logit_scale))
    return cross_entropy_from_logits_reference(
        flat_logits, flat_labels, ignore_index=ignore_index,
        softcap=spec.softcap, logit_scale=spec.logit_scale, num_items_in_batch=num_items_in_batch,
    )
