"""Up-front checks of a training dataset's columns, with errors that list what was found."""
from __future__ import annotations

_CONVERSATIONAL = ("messages", "conversations", "prompt", "completion", "input_ids")


def dataset_columns(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and hasattr(dataset, "features") and dataset.features is not None:
        names = list(dataset.features)
    return list(names) if names is not None else None


def check_sft_dataset(dataset, text_field: str, formatting_func=None) -> None:
    """Raise if the dataset has neither ``text_field`` nor a conversational / pre-tokenized column."""
    if formatting_func is not None:
        return
    columns = dataset_columns(dataset)
    if columns is None:
        return  # streaming datasets without known features are checked by TRL on the first batch
    if text_field in columns or any(c in columns for c in _CONVERSATIONAL):
        return
    raise ValueError(
        f"The training dataset has no {text_field!r} column (dataset_text_field) and no 'messages' column; "
        f"columns found: {columns}. Set dataset_text_field to the column holding the text, rename your "
        "conversation column to 'messages', or format it first (e.g. pronghorn.data.apply_chat_template)."
    )
