"""What pronghorn adds around TRL's packing: length enforcement, safety checks and the row-count note.

``packing=True`` in ``SFTConfig`` uses TRL's best-fit-decreasing packer (``trl.pack_dataset`` with
strategy ``"bfd"``): several short examples share one row of up to ``max_seq_length`` tokens and
a ``seq_lengths`` column records where each begins. The collator turns that into ``position_ids``
that restart at 0 per example, which is how both RoPE and the attention implementation (see
:mod:`pronghorn.nn.attention`) know the boundaries: no token attends across examples.

TRL truncates an over-long example silently. Here the choice is explicit: ``overlong="truncate"``
cuts it to ``max_length`` (keeping the start) and logs how many were cut; ``overlong="error"``
refuses the dataset and names the first offending example. Either way an example never spills
into its neighbour.

Packing changes the number of rows, and so the number of optimizer steps per epoch:
:func:`packing_note` words that for the log.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

__all__ = [
    "OverlongExampleError",
    "enforce_max_length",
    "pack_examples",
    "packing_note",
    "padding_free_safety_issues",
    "truncate_example",
]

logger = logging.getLogger(__name__)

_OVERLONG = ("truncate", "error")
_TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask", "completion_mask", "assistant_masks")


class OverlongExampleError(ValueError):
    """An example is longer than ``max_length`` and ``overlong="error"`` was configured."""


def _check_overlong(overlong: str) -> None:
    if overlong not in _OVERLONG:
        raise ValueError(f"overlong={overlong!r}; use 'truncate' (cut to max_length, keeping the start) or 'error'")


def truncate_example(example: dict[str, Any], max_length: int, overlong: str = "truncate", index: int | None = None):
    """Return ``example`` with its token columns cut to ``max_length``, or raise for ``overlong="error"``.

    Every per-token column (``input_ids``, ``labels``, masks) is cut together so they stay aligned.
    """
    _check_overlong(overlong)
    length = len(example["input_ids"])
    if length <= max_length:
        return example
    if overlong == "error":
        where = f"example {index}" if index is not None else "an example"
        raise OverlongExampleError(
            f"{where} has {length} tokens, more than max_seq_length={max_length}; raise max_seq_length, "
            "shorten the example, or set overlong='truncate' to keep its first max_seq_length tokens"
        )
    out = dict(example)
    for column in _TOKEN_COLUMNS:
        if column in out and out[column] is not None and len(out[column]) == length:
            out[column] = out[column][:max_length]
    return out


def enforce_max_length(dataset, max_length: int, overlong: str = "truncate", num_proc: int | None = None):
    """Apply :func:`truncate_example` to every row of a tokenized ``datasets.Dataset`` (or list of dicts).

    Logs how many examples were truncated. With ``overlong="error"`` it raises on the first one.
    """
    _check_overlong(overlong)
    if isinstance(dataset, list):
        lengths = [len(ex["input_ids"]) for ex in dataset]
        out = [truncate_example(ex, max_length, overlong, i) for i, ex in enumerate(dataset)]
    else:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        if overlong == "error":
            for i, n in enumerate(lengths):
                if n > max_length:
                    truncate_example({"input_ids": range(n)}, max_length, "error", i)
        out = dataset.map(
            truncate_example, fn_kwargs={"max_length": max_length, "overlong": overlong}, num_proc=num_proc,
            desc=f"Truncating to {max_length} tokens",
        ) if any(n > max_length for n in lengths) else dataset
    cut = sum(n > max_length for n in lengths)
    if cut:
        logger.warning(
            "pronghorn: %d of %d examples were longer than max_seq_length=%d and were truncated to their first "
            "%d tokens (longest: %d); set overlong='error' to refuse such data instead",
            cut, len(lengths), max_length, max_length, max(lengths),
        )
    return out


def pack_examples(dataset, max_length: int, overlong: str = "truncate", strategy: str = "bfd"):
    """Enforce ``max_length`` as configured, then pack with TRL's packer (``seq_lengths`` column added)."""
    from trl import pack_dataset

    if strategy not in ("bfd", "bfd_split"):
        raise ValueError(
            f"packing strategy {strategy!r} is not boundary-preserving; use 'bfd' (or 'bfd_split', which splits "
            "over-long examples into separate sequences instead of truncating them)"
        )
    if strategy == "bfd":
        dataset = enforce_max_length(dataset, max_length, overlong)
    return pack_dataset(dataset, max_length, strategy=strategy)


def packing_note(num_examples: int, num_rows: int, batch_size: int, grad_accum: int = 1, world_size: int = 1) -> str:
    """The log/docs sentence on how packing changed rows and optimizer steps per epoch."""
    per_step = batch_size * grad_accum * world_size
    return (
        f"packing turned {num_examples} examples into {num_rows} rows; with {per_step} rows per optimizer step an "
        f"epoch is {math.ceil(num_rows / per_step)} steps instead of {math.ceil(num_examples / per_step)}. "
        "Settings counted in steps (max_steps, warmup_steps, save_steps, logging_steps) now cover more examples each."
    )


def padding_free_safety_issues(model, batch: dict[str, Any]) -> list[str]:
    """Reasons why ``batch`` (a padding-free or packed stream) could attend across example boundaries.

    Returns an empty list when the batch and the model's attention setup keep examples separate.
    Checks: a 2-D ``attention_mask`` next to restarting ``position_ids`` (flash attention then ignores the
    boundaries and sdpa/eager see one long sequence); a key-value cache being built (transformers only
    derives boundaries from ``position_ids`` when no cache is passed); labels that would train across a
    boundary; and an attention implementation whose boundary handling is unknown.
    """
    issues = []
    pos = batch.get("position_ids")
    if pos is None:
        return ["no position_ids: a flattened batch needs position_ids restarting at 0 for every example"]
    starts = pos == 0
    if "attention_mask" in batch and batch["attention_mask"] is not None and int(starts.sum()) > pos.shape[0]:
        issues.append(
            "the batch has an attention_mask and several examples per row; drop the attention_mask so the "
            "attention implementation derives example boundaries from position_ids"
        )
    labels = batch.get("labels")
    if labels is not None and torch.any(labels[starts] != -100):
        issues.append("labels at the first token of an example are not -100: the loss would predict across a boundary")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    checkpointing = base.training and any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
    if batch.get("use_cache") is not False and getattr(config, "use_cache", False) and not checkpointing:
        issues.append(
            "use_cache is on: the model would build a cache, and with a cache present transformers does not "
            "derive example boundaries from position_ids (sdpa/eager attend across examples); pass use_cache=False"
        )
    known = {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "pronghorn_sdpa_varlen"}
    if config._attn_implementation not in known:
        issues.append(f"attention implementation {config._attn_implementation!r} is not known to respect boundaries")
    return issues
