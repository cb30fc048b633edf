"""Turning whatever a dataset holds for an image into an RGB PIL image, or a clear error.

Accepted: ``PIL.Image.Image``; a file path (``str`` / ``os.PathLike``, e.g. a URL you downloaded first);
raw encoded ``bytes``; base64 text or a ``data:image/...;base64,`` URI; the ``{"bytes": ..., "path": ...}``
dicts of a ``datasets.Image(decode=False)`` column; HWC ``uint8`` arrays.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageLoadError(ValueError):
    """An image of an example could not be read; the message names the example and the source."""


def describe_source(source) -> str:
    """A short, printable description of an image source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return repr(text if len(text) <= 80 else text[:77] + "...")
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes starting {bytes(source[:8])!r}"
    if isinstance(source, dict):
        return f"dict with keys {sorted(source)}"
    return type(source).__name__


def _from_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated file fails here, not later inside the processor
    return image


def _decode_base64(text: str) -> bytes | None:
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header:
            raise ValueError(f"data URI {header!r} is not base64-encoded")
        return base64.b64decode(payload, validate=False)
    if len(text) > 64 and "/" not in text[:8] and "." not in text[-6:]:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def _open(source) -> Image.Image:
    if isinstance(source, Image.Image):
        source.load()
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source))
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return _from_bytes(source["bytes"])
        if source.get("path"):
            return _open(source["path"])
        raise ValueError("the dict has neither 'bytes' nor 'path'")
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            raise ValueError("URLs are not downloaded during training; download the image and pass its path")
        data = _decode_base64(source)
        if data is not None:
            return _from_bytes(data)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        with Image.open(path) as image:
            image.load()
            return image.copy()
    if hasattr(source, "__array__"):
        import numpy as np

        return Image.fromarray(np.asarray(source))
    raise TypeError(f"unsupported image type {type(source).__name__}; pass a PIL image, a path, bytes or base64")


def load_image(source, example_index: int | None = None) -> Image.Image:
    """``source`` as an RGB PIL image; raises :class:`ImageLoadError` naming the example and the source."""
    try:
        image = _open(source)
    except (OSError, UnidentifiedImageError, ValueError, TypeError, SyntaxError) as error:
        where = f"example {example_index}" if example_index is not None else "an example"
        raise ImageLoadError(
            f"cannot read the image of {where} ({describe_source(source)}): {type(error).__name__}: {error}. "
            "Fix or drop that example, or check the image column holds PIL images, file paths, bytes or base64."
        ) from error
    return image if image.mode == "RGB" else image.convert("RGB")
