"""ShareGPT conversions: ``from``/``value`` turns to ``role``/``content``, and flat columns to conversations."""
from __future__ import annotations

import math
import random
import re

from pronghorn.data.chat_templates import ROLE_ALIASES

_COLUMN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_ .\-]*)\}")
_CONVERSATION_COLUMNS = ("conversations", "messages", "conversation")


def find_conversation_column(column_names, column: str | None = None) -> str:
    """The column holding conversations: ``column`` if given, else the first of conversations/messages/conversation."""
    if column is not None:
        if column not in column_names:
            raise KeyError(f"column {column!r} not in the dataset (columns: {list(column_names)})")
        return column
    for name in _CONVERSATION_COLUMNS:
        if name in column_names:
            return name
    raise KeyError(
        f"no conversation column found (looked for {list(_CONVERSATION_COLUMNS)}; columns: {list(column_names)}); "
        "pass column= / conversation_column= naming it"
    )


def _standardize_turn(turn, index: int, aliases: dict) -> dict:
    if not isinstance(turn, dict):
        raise TypeError(f"conversation turn {index} is a {type(turn).__name__}, expected a dict")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role is None:
        raise KeyError(f"conversation turn {index} has neither 'role' nor 'from' (keys: {sorted(turn)})")
    key = str(role).strip().lower()
    if key not in aliases:
        raise ValueError(f"unknown role {role!r} in turn {index}; known: {sorted(aliases)} (extend with aliases=)")
    out = {k: v for k, v in turn.items() if k not in ("from", "value", "role", "content") and v is not None}
    out["role"] = aliases[key]
    out["content"] = content
    return out


def standardize_sharegpt(dataset, column: str | None = None, aliases: dict | None = None, num_proc=None):
    """Convert ShareGPT turns (``{"from": "human", "value": ...}``) to ``{"role": "user", "content": ...}``.

    Role names human/gpt/system/tool and their common variants are mapped; pass ``aliases`` to add more
    (``{"bot2": "assistant"}``). Already-standard turns pass through unchanged. Keys other than from/value
    (``tool_calls``, ``name``, ...) are kept.
    """
    column = find_conversation_column(dataset.column_names, column)
    table = {**ROLE_ALIASES, **{k.lower(): v for k, v in (aliases or {}).items()}}

    def convert(batch):
        return {column: [[_standardize_turn(t, i, table) for i, t in enumerate(conv)] for conv in batch[column]]}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    return dataset.map(convert, batched=True, **kwargs)


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _parse_prompt(template: str) -> list[tuple[bool, str]]:
    """Split ``merged_prompt`` into ``(optional, text)`` pieces; ``[[ ... ]]`` marks an optional piece."""
    pieces, pos = [], 0
    while True:
        start = template.find("[[", pos)
        if start < 0:
            tail = template[pos:]
            if "]]" in tail:
                raise ValueError(f"merged_prompt has ']]' without a matching '[[': {template!r}")
            pieces.append((False, tail))
            return [p for p in pieces if p[1]]
        end = template.find("]]", start + 2)
        if end < 0:
            raise ValueError(f"merged_prompt has '[[' without a matching ']]': {template!r}")
        inner = template[start + 2:end]
        if "[[" in inner:
            raise ValueError(f"merged_prompt cannot nest [[ ]] sections: {template!r}")
        if "]]" in template[pos:start]:
            raise ValueError(f"merged_prompt has ']]' without a matching '[[': {template!r}")
        pieces.append((False, template[pos:start]))
        pieces.append((True, inner))
        pos = end + 2


def _render_piece(text: str, row: dict, optional: bool, index: int) -> str | None:
    values = {}
    for name in _COLUMN.findall(text):
        value = row[name]
        if _is_missing(value):
            if optional:
                return None
            raise ValueError(
                f"row {index}: required column {name!r} is empty; wrap its part of merged_prompt in [[ ]] to drop "
                "it when empty, or fill the value"
            )
        values[name] = str(value)
    return _COLUMN.sub(lambda m: values[m.group(1)], text)


def to_sharegpt(dataset, merged_prompt: str = "", merged_column_name: str = "instruction",
                output_column_name: str = "output", remove_unused_columns: bool = True,
                conversation_extension: int = 1, random_state: int = 3407):
    """Turn a flat dataset into ShareGPT conversations (column ``conversations``, turns ``from``/``value``).

    Args:
        dataset: a ``datasets.Dataset``.
        merged_prompt: the user turn, with column names in braces and optional parts in double brackets:
            ``"{instruction}[[\\nYour input is:\\n{input}]]"``: a ``[[ ]]`` part is dropped when any column in
            it is empty (None, NaN or blank). Defaults to ``"{merged_column_name}"``.
        merged_column_name: name for the merged prompt when ``merged_prompt`` is empty (kept for Unsloth parity).
        output_column_name: the column holding the assistant's answer.
        remove_unused_columns: keep only ``conversations`` (else keep every original column too).
        conversation_extension: merge this many rows into one multi-turn conversation: each row is followed by
            ``conversation_extension - 1`` other rows drawn at random (seeded by ``random_state``).
        random_state: seed for ``conversation_extension``.
    """
    columns = list(dataset.column_names)
    if not merged_prompt:
        merged_prompt = "{" + merged_column_name + "}"
    pieces = _parse_prompt(merged_prompt)
    used = {name for _, text in pieces for name in _COLUMN.findall(text)}
    if not used:
        raise ValueError(f"merged_prompt names no column in braces, e.g. '{{instruction}}': {merged_prompt!r}")
    missing = sorted(used - set(columns)) + ([output_column_name] if output_column_name not in columns else [])
    if missing:
        raise KeyError(f"to_sharegpt: column(s) {missing} not in the dataset (columns: {columns})")
    if not isinstance(conversation_extension, int) or conversation_extension < 1:
        raise ValueError(f"conversation_extension must be an integer >= 1, got {conversation_extension!r}")
    if conversation_extension > 1 and conversation_extension > len(dataset):
        raise ValueError(
            f"conversation_extension={conversation_extension} needs at least that many rows; the dataset has "
            f"{len(dataset)}"
        )

    def turns(row: dict, index: int) -> list[dict]:
        rendered = [_render_piece(text, row, optional, index) for optional, text in pieces]
        answer = row[output_column_name]
        if _is_missing(answer):
            raise ValueError(f"row {index}: output column {output_column_name!r} is empty")
        return [{"from": "human", "value": "".join(p for p in rendered if p is not None)},
                {"from": "gpt", "value": str(answer)}]

    if conversation_extension == 1:
        def convert(row, index):
            return {"conversations": turns(row, index)}
        return dataset.map(convert, with_indices=True,
                           remove_columns=columns if remove_unused_columns else None)

    pairs = [turns(row, i) for i, row in enumerate(dataset)]
    rng = random.Random(random_state)
    n = len(pairs)
    extra_rows = []
    for i in range(n):
        # Draw from the other n - 1 rows without building a list per row.
        others = rng.sample(range(n - 1), conversation_extension - 1)
        extra_rows.append([j + (j >= i) for j in others])

    def extend(_row, index):
        conversation = list(pairs[index])
        for j in extra_rows[index]:
            conversation.extend(pairs[j])
        return {"conversations": conversation}

    return dataset.map(extend, with_indices=True, remove_columns=columns if remove_unused_columns else None)
