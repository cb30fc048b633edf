"""Padding-free batching: a batch of examples of different lengths as one flat token stream.

The examples of a batch are concatenated into ``input_ids`` of shape ``[1, total_tokens]`` with
``position_ids`` restarting at 0 for each example and no ``attention_mask``; no pad token is ever
computed on. The attention implementation finds the example boundaries from ``position_ids``
(flash-attention varlen, transformers' packed-sequence masks for sdpa/eager, or pronghorn's
per-sequence sdpa), and RoPE sees each example's own positions.

Labels are shift-safe: the first token of every example is ``-100``. Causal-LM losses predict
``labels[t+1]`` from position ``t``, so the last token of one example would otherwise be trained
to predict the first token of the next; with that label ignored, exactly the targets of a padded
batch remain (whose first token per row is never a target either).

TRL's ``DataCollatorForLanguageModeling(padding_free=True)`` does exactly this (it also emits
``cu_seq_lens_q/k`` and ``max_length_q/k`` for flash-attention varlen), so it is reused here;
:class:`PaddingFreeCollator` adds the per-example length limit with an explicit over-long policy
and ``use_cache=False`` in every batch, because a key-value cache built during a training forward
stops transformers from deriving the boundaries from ``position_ids``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from pronghorn.data.packing import truncate_example

__all__ = ["PaddingFreeCollator"]

logger = logging.getLogger(__name__)


@dataclass
class PaddingFreeCollator(DataCollatorForLanguageModeling):
    """Collate tokenized examples into one padding-free stream (or packed rows, when they carry ``seq_lengths``).

    Args:
        pad_token_id: id used only if ``pad_to_multiple_of`` asks for trailing padding.
        padding_free: ``True`` (default) flattens the batch; ``False`` gives a padded batch with an
            ``attention_mask`` (TRL's behaviour), for comparison or for models that need it.
        max_length: per-example token limit, enforced here (``None``: no limit).
        overlong: ``"truncate"`` keeps the first ``max_length`` tokens and warns once;
            ``"error"`` raises :class:`pronghorn.data.packing.OverlongExampleError`.
        pad_to_multiple_of: pad the flat stream to a multiple of this (pad positions are their own
            length-1 sequences with label ``-100``).
        set_use_cache_false: put ``use_cache=False`` into each batch (default ``True``).

    Example::

        >>> c = PaddingFreeCollator(pad_token_id=0)
        >>> b = c([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
        >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["labels"].tolist()
        ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
    """

    padding_free: bool = True
    max_length: int | None = None
    overlong: str = "truncate"
    set_use_cache_false: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.max_length is not None and "seq_lengths" not in examples[0]:
            cut = sum(len(ex["input_ids"]) > self.max_length for ex in examples)
            examples = [truncate_example(ex, self.max_length, self.overlong) for ex in examples]
            if cut and not getattr(self, "_warned", False):
                self._warned = True
                logger.warning(
                    "pronghorn: truncated %d example(s) longer than max_seq_length=%d (warned once; "
                    "set overlong='error' to refuse them)", cut, self.max_length,
                )
        if "seq_lengths" in examples[0]:
            self._check_seq_lengths(examples)
        batch = super().torch_call(examples)
        if self.set_use_cache_false:
            batch["use_cache"] = False
        return batch

    def _check_seq_lengths(self, examples):
        for i, ex in enumerate(examples):
            if self.max_length is not None and len(ex["input_ids"]) > self.max_length:
                raise ValueError(
                    f"packed row {i} has {len(ex['input_ids'])} tokens, more than max_length={self.max_length}; "
                    "pack with the same max_length the collator enforces"
                )
            if sum(ex["seq_lengths"]) != len(ex["input_ids"]):
                raise ValueError(
                    f"packed row {i}: seq_lengths sum to {sum(ex['seq_lengths'])} but the row has "
                    f"{len(ex['input_ids'])} tokens; the example boundaries would be wrong"
                )
