"""Loading local data files (CSV, TSV, JSON, JSONL, Parquet, text, Arrow) through ``datasets``."""
from __future__ import annotations

import os
from pathlib import Path

# Extension -> (datasets builder, extra builder arguments)
_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".parquet": ("parquet", {}),
    ".pq": ("parquet", {}),
    ".txt": ("text", {}),
    ".arrow": ("arrow", {}),
}


def _extension(path: str) -> str:
    name = Path(path).name.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path(name).suffix


def load_dataset_file(path, split: str = "train", **kwargs):
    """Load one local file (or a list of files of one type) into a ``datasets.Dataset``.

    The builder is picked by extension: ``.csv``, ``.tsv``, ``.json``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq``,
    ``.txt`` (one example per line, column ``text``) and ``.arrow``; compressed ``.gz``/``.bz2``/``.xz``/``.zst``
    variants too. Extra keyword arguments go to ``datasets.load_dataset`` (``cache_dir``, ``delimiter``, ...).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("load_dataset_file needs at least one path")
    paths = [os.fspath(p) for p in paths]
    extensions = {_extension(p) for p in paths}
    if len(extensions) != 1:
        raise ValueError(f"all files must have the same type; got extensions {sorted(extensions)}")
    ext = extensions.pop()
    if ext not in _BUILDERS:
        raise ValueError(
            f"cannot load {paths[0]!r}: unknown file type {ext or '(no extension)'!r}; supported: "
            f"{', '.join(sorted(_BUILDERS))} (optionally compressed). For other formats build a "
            "datasets.Dataset yourself (Dataset.from_pandas / from_list)"
        )
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data file not found: {p!r}")
    from datasets import load_dataset

    builder, extra = _BUILDERS[ext]
    return load_dataset(builder, data_files=paths, split=split, **{**extra, **kwargs})
