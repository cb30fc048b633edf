"""Train on assistant tokens only: labels are -100 everywhere except inside assistant turns.

A response region starts right after a response marker (``<|im_start|>assistant\\n``), so the marker
itself carries no loss, and ends right after the end-of-turn marker (``<|im_end|>``), which does carry
loss so the model learns to stop, or at the next instruction/system/tool marker when the template has
no end marker. Markers are found in the bytes of already-tokenized sequences (see ``token_bytes``), so
the mask works on any tokenization, on every turn of a multi-turn conversation, and on tool turns.

Inside a trainer the mask is folded into the tokenized datasets' ``labels`` column, which TRL's
collator carries through padding-free flattening (``padding_free=True``) and which TRL packs together
with ``input_ids`` (``packing=True``); packed rows are masked segment by segment using ``seq_lengths``.
"""
from __future__ import annotations

import warnings

import numpy as np

from pronghorn.data.markers import ResponseParts, resolve_parts
from pronghorn.data.token_bytes import TokenBytes, token_bytes

IGNORE_INDEX = -100


def _occurrences(data: bytes, needle: bytes) -> list[int]:
    found, start = [], data.find(needle)
    while start >= 0:
        found.append(start)
        start = data.find(needle, start + len(needle))
    return found


def _byte_regions(data: bytes, parts: ResponseParts) -> list[tuple[int, int]]:
    """Byte ranges ``[a, b)`` that belong to assistant responses."""
    # (position, priority, kind, marker end); at equal positions an opener wins over a closer.
    events = []
    for part in parts.response_parts:
        response = part.encode("utf-8")
        for pos in _occurrences(data, response):
            events.append((pos, 1, "R", pos + len(response)))
    for part in parts.instruction_parts:
        for pos in _occurrences(data, part.encode("utf-8")):
            events.append((pos, 1, "S", pos))
    if parts.end_part:
        end = parts.end_part.encode("utf-8")
        for pos in _occurrences(data, end):
            events.append((pos, 0, "E", pos + len(end)))
    events.sort()
    # A chunk that begins mid-turn (bfd_split/wrapped packing) starts outside: the end-of-turn marker closes
    # user and system turns too, so whether the leading partial turn was the assistant's cannot be told.
    regions, start = [], None
    covered = -1  # end of the last response marker: markers nested in it are part of it
    for pos, _prio, kind, mark_end in events:
        if pos < covered:
            continue
        if kind == "R":
            if start is not None:
                regions.append((start, pos))
            start, covered = mark_end, mark_end
        elif start is not None:
            regions.append((start, mark_end))
            start = None
    if start is not None:
        regions.append((start, len(data)))
    return [(a, b) for a, b in regions if b > a]


def _segment_mask(tb: TokenBytes, ids, parts: ResponseParts) -> np.ndarray:
    data, starts, ends = tb.spans(ids)
    mask = np.zeros(len(starts), dtype=bool)
    for a, b in _byte_regions(data, parts):
        # Every token overlapping the region: a token straddling the marker's end carries response text.
        first = int(np.searchsorted(ends, a, side="right"))
        last = int(np.searchsorted(starts, b, side="left"))
        mask[first:last] = True
    return mask


def response_mask(input_ids, tokenizer, instruction_part=None, response_part=None, end_part=None,
                  seq_lengths=None) -> list[int]:
    """1 for tokens of ``input_ids`` that belong to assistant responses, else 0.

    Args:
        input_ids: token ids of one example (or of one packed row, with ``seq_lengths``).
        tokenizer: the tokenizer that produced the ids.
        instruction_part / response_part: marker texts; derived from the tokenizer's chat template when omitted.
        end_part: end-of-turn text (trained on); ``None`` = from the template, ``False`` = none.
        seq_lengths: lengths of the examples packed into this row; each is masked on its own. A segment cut
            out of the middle of a conversation (``bfd_split``/``wrapped`` packing) trains from its first
            response marker on; its leading partial turn carries no loss.
    """
    parts = resolve_parts(tokenizer, instruction_part, response_part, end_part)
    return _mask_ids(token_bytes(tokenizer), list(input_ids), parts, seq_lengths).astype(int).tolist()


def response_labels(input_ids, tokenizer, instruction_part=None, response_part=None, end_part=None) -> list[int]:
    """Labels for one tokenized example: the token id on assistant-response tokens, ``-100`` elsewhere."""
    mask = response_mask(input_ids, tokenizer, instruction_part, response_part, end_part)
    return [int(t) if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]


def _mask_ids(tb: TokenBytes, ids: list, parts: ResponseParts, seq_lengths) -> np.ndarray:
    if not seq_lengths:
        return _segment_mask(tb, ids, parts)
    if sum(seq_lengths) != len(ids):
        raise ValueError(f"seq_lengths {list(seq_lengths)} do not add up to the row length {len(ids)}")
    out, offset = [], 0
    for length in seq_lengths:
        out.append(_segment_mask(tb, ids[offset:offset + length], parts))
        offset += length
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _labels_batch(batch, tb: TokenBytes, parts: ResponseParts):
    new_labels = []
    lengths = batch.get("seq_lengths")
    old = batch.get("labels")
    for row, ids in enumerate(batch["input_ids"]):
        mask = _mask_ids(tb, list(ids), parts, lengths[row] if lengths is not None else None)
        ids_arr = np.asarray(ids, dtype=np.int64)
        if old is not None:  # keep tokens the trainer already excluded (e.g. a completion mask)
            mask &= np.asarray(old[row], dtype=np.int64) != IGNORE_INDEX
        new_labels.append(np.where(mask, ids_arr, IGNORE_INDEX).tolist())
    return {"labels": new_labels}


def _tokenizer_of(trainer):
    tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)  # a processor wraps its tokenizer
    if tok is None:
        raise ValueError("the trainer has no tokenizer (processing_class); pass one to the trainer")
    return tok


def _mask_dataset(dataset, name: str, tb: TokenBytes, parts: ResponseParts, num_proc):
    columns = getattr(dataset, "column_names", None)
    if columns is None or "input_ids" not in columns:
        raise ValueError(
            f"the trainer's {name} has no 'input_ids' column (columns: {columns}); call train_on_responses_only "
            "after the trainer is built, so its datasets are tokenized (SFTTrainer does this in __init__)"
        )
    kwargs = {} if not hasattr(dataset, "_fingerprint") else {"desc": f"Masking non-response tokens ({name})"}
    if num_proc and hasattr(dataset, "_fingerprint"):
        kwargs["num_proc"] = num_proc
    masked = dataset.map(_labels_batch, batched=True, fn_kwargs=dict(tb=tb, parts=parts),
                         **kwargs)
    if not hasattr(masked, "__len__"):
        return masked  # an IterableDataset: nothing to count up front
    empty = [i for i, labels in enumerate(masked["labels"]) if all(t == IGNORE_INDEX for t in labels)]
    if empty and len(empty) == len(masked):
        sample = masked[0]["input_ids"]
        raise ValueError(
            f"train_on_responses_only left no trained token in any example of the {name} "
            f"({len(masked)} examples): the markers do not occur in the tokenized text. Used {parts.describe()}. "
            f"The first example reads {tb.spans(sample)[0][:300]!r}. Pass the instruction_part/response_part "
            "this template actually renders (see pronghorn.data.get_template_entry(name).response_part) or "
            "omit them to derive them from the tokenizer's chat template"
        )
    if empty:
        shown = ", ".join(map(str, empty[:20])) + (" ..." if len(empty) > 20 else "")
        warnings.warn(
            f"{len(empty)} of {len(masked)} examples of the {name} have no response token to train on "
            f"(indices {shown}); usually they were truncated before the answer (raise max_length) or lack an "
            "assistant turn. They add no loss.", stacklevel=3,
        )
    return masked


def _check_collator(trainer, dataset) -> None:
    """Fail loudly if the trainer's collator rebuilds labels instead of using the masked column."""
    collator = getattr(trainer, "data_collator", None)
    if collator is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return
    examples = [dataset[i] for i in range(min(2, len(dataset)))]
    keep = {"input_ids", "labels", "seq_lengths", "attention_mask", "position_ids"}
    try:
        batch = collator([{k: v for k, v in ex.items() if k in keep} for ex in examples])
    except (ValueError, TypeError, KeyError) as err:
        raise RuntimeError(
            f"the trainer's data collator ({type(collator).__name__}) cannot batch the masked 'labels' column "
            f"({err}); use TRL's DataCollatorForLanguageModeling (SFTTrainer's default) or a collator that pads "
            "and keeps 'labels'"
        ) from err
    got = np.asarray(batch["labels"])
    wanted = [np.asarray(ex["labels"]) for ex in examples]
    if got.shape[0] == 1 and got.shape[1] >= sum(len(w) for w in wanted) and len(wanted) > 1:
        rows = [got[0, : sum(len(w) for w in wanted)]]
        wanted = [np.concatenate(wanted)]
    else:
        rows = [got[i, : len(w)] for i, w in enumerate(wanted)]
    for row, want in zip(rows, wanted):
        if np.any(row[want == IGNORE_INDEX] != IGNORE_INDEX):
            raise RuntimeError(
                f"the trainer's data collator ({type(collator).__name__}) rebuilds labels from input_ids and would "
                "train on the masked tokens; use TRL's DataCollatorForLanguageModeling (SFTTrainer's default) or "
                "a collator that keeps the 'labels' column"
            )


def train_on_responses_only(trainer, instruction_part=None, response_part=None, *, end_part=None,
                            num_proc=None):
    """Make ``trainer`` compute the loss on assistant tokens only, in every turn; returns the trainer.

    Args:
        trainer: a built TRL ``SFTTrainer`` (pronghorn's included); its tokenized ``train_dataset`` and
            ``eval_dataset`` get masked ``labels``. Works with ``SFTConfig(padding_free=True)`` and
            ``SFTConfig(packing=True)``.
        instruction_part: text opening a user turn (a string or a list of openers of every non-assistant turn,
            e.g. user and tool); derived from the tokenizer's chat template when omitted.
        response_part: text opening an assistant turn; derived from the template when omitted.
        end_part: text closing an assistant turn, trained on; ``None`` takes it from the template, ``False``
            trains until the next instruction part instead.
        num_proc: processes for ``datasets.map``.
    """
    tokenizer = _tokenizer_of(trainer)
    parts = resolve_parts(tokenizer, instruction_part, response_part, end_part)
    tb = token_bytes(tokenizer)
    if getattr(trainer, "train_dataset", None) is not None:
        trainer.train_dataset = _mask_dataset(trainer.train_dataset, "train_dataset", tb, parts, num_proc)
        _check_collator(trainer, trainer.train_dataset)
    eval_ds = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_ds, dict):
        trainer.eval_dataset = {key: _mask_dataset(ds, f"eval_dataset[{key!r}]", tb, parts, num_proc)
                                for key, ds in eval_ds.items()}
    elif eval_ds is not None:
        trainer.eval_dataset = _mask_dataset(eval_ds, "eval_dataset", tb, parts, num_proc)
    return trainer
