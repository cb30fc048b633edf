"""Safe output directories: build in a temporary sibling, check free space first, rename at the end.

Every exporter writes through :func:`atomic_output_dir`, so an interrupted export never leaves a
half-written model where a user (or a loader) would take it for a finished one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ExportError(RuntimeError):
    """An export could not be written; the message says what was wrong and how to fix it."""


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return int(float(number) * _UNITS[unit])
            except ValueError:
                break
    raise ValueError(f"max_shard_size/size {size!r} is not a size; use an int of bytes or e.g. '5GB', '500MB'")


def human_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable string (GiB-based)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty directory (or a file) unless ``overwrite``."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"export target {str(target)!r} exists and is a file, not a directory; "
                          "choose another save_directory or remove the file")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"export target {str(target)!r} already exists and is not empty; "
                          "pass overwrite=True to replace it, or choose another save_directory")


def check_disk_space(directory: Path, required_bytes: int, what: str = "this export") -> None:
    """Raise if the filesystem holding ``directory`` has less than ``required_bytes`` free."""
    free = shutil.disk_usage(directory).free
    if free < required_bytes:
        raise ExportError(
            f"not enough disk space for {what}: it needs about {human_bytes(required_bytes)} "
            f"but {str(directory)!r} has {human_bytes(free)} free; free "
            f"{human_bytes(required_bytes - free)} or choose a save_directory on a larger disk")


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, overwrite: bool = False, required_bytes: int = 0,
                      what: str = "this export") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it replaces ``target``.

    The temporary directory lives in ``target``'s parent so the final rename stays on one filesystem
    (atomic). On any exception it is removed and ``target`` is left as it was. Free space is checked
    against ``required_bytes`` before anything is written.
    """
    target = Path(target).expanduser().resolve()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(target.parent, required_bytes, what)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        # Re-check: another process may have created the target while we were writing.
        check_target(target, overwrite)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            backup.rmdir()
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
