"""Reading one dataset example into chat messages (image parts without payload) plus its images, in order.

An example is either

- ``{"messages": [...]}`` whose contents are strings or lists of parts ``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": <PIL / path / bytes / base64>}``, ``{"type": "video", "video": ...}``;
  image parts may omit the payload and take the images of an ``images`` (or ``image``) column in order;
- ``{"text": ..., "images": [...]}``: text already rendered, with the processor's image placeholder where
  each image goes.

``datasets`` stores lists of parts as Arrow structs, so every part carries every key (``None`` where
absent); those ``None`` keys are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_MESSAGE_KEYS = ("messages", "conversations", "conversation")
_PAYLOAD_KEYS = ("image", "path", "url", "base64", "bytes")


class ExampleFormatError(ValueError):
    """An example's structure is wrong; the message names the example and what would be right."""


@dataclass
class ParsedExample:
    index: int
    messages: list[dict] | None  # image/video parts reduced to {"type": "image"} / {"type": "video"}
    text: str | None  # pre-rendered text, when the example has no messages
    image_sources: list = field(default_factory=list)
    video_sources: list = field(default_factory=list)

    @property
    def has_assistant_turn(self) -> bool:
        return self.messages is None or any(m.get("role") == "assistant" for m in self.messages)


def _column_images(example: dict) -> list:
    images = example.get("images")
    if images is None and example.get("image") is not None:
        images = [example["image"]]
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [img for img in images if img is not None]


def _payload(part: dict):
    for key in _PAYLOAD_KEYS:
        value = part.get(key)
        if value is not None:
            return value
    return None


def _clean_content(content, index: int, role, column: list, used: list, videos: list):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ExampleFormatError(f"example {index}: a {role!r} message's content is a {type(content).__name__}; "
                                 "use a string or a list of {'type': 'text'|'image', ...} parts")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        kind = part.get("type")
        if kind == "text" or (kind is None and part.get("text") is not None):
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind in ("image", "image_url"):
            payload = _payload(part)
            if isinstance(payload, dict) and "url" in payload and kind == "image_url":
                payload = payload["url"]
            used.append(("part", payload) if payload is not None else ("column", None))
            parts.append({"type": "image"})
        elif kind == "video":
            videos.append(part.get("video") if part.get("video") is not None else _payload(part))
            parts.append({"type": "video"})
        else:
            raise ExampleFormatError(f"example {index}: unknown content part type {kind!r} in a {role!r} message; "
                                     "use 'text', 'image' or 'video'")
    return parts


def parse_example(example: dict, index: int) -> ParsedExample:
    """Split ``example`` into messages (or text) and the image sources in placeholder order."""
    if not isinstance(example, dict):
        raise ExampleFormatError(f"example {index} is a {type(example).__name__}, not a dict of columns")
    column = _column_images(example)
    messages = next((example[k] for k in _MESSAGE_KEYS if example.get(k) is not None), None)
    if messages is None:
        text = example.get("text")
        if not isinstance(text, str):
            raise ExampleFormatError(
                f"example {index} has none of the columns {list(_MESSAGE_KEYS)} (chat messages) or 'text'; its "
                f"columns are {sorted(example)}. Give each example 'messages' with image parts, or 'text' + 'images'"
            )
        return ParsedExample(index, None, text, list(column))
    if not isinstance(messages, (list, tuple)):
        raise ExampleFormatError(f"example {index}: 'messages' must be a list of {{'role', 'content'}} dicts")
    cleaned, used, videos = [], [], []
    for message in messages:
        role = message.get("role") or message.get("from")
        content = message.get("content", message.get("value"))
        cleaned.append({"role": role, "content": _clean_content(content, index, role, column, used, videos)})
    from_column = sum(1 for origin, _ in used if origin == "column")
    from_parts = len(used) - from_column
    if from_column and from_column != len(column):
        raise ExampleFormatError(
            f"example {index}: its messages have {from_column} image placeholder(s) without an image, but its "
            f"'images' column holds {len(column)} image(s); give one image per placeholder"
        )
    if from_parts and column and not from_column:
        raise ExampleFormatError(
            f"example {index}: images are given both inside the messages ({from_parts}) and in the 'images' column "
            f"({len(column)}); keep one of the two"
        )
    if not used and column:
        raise ExampleFormatError(
            f"example {index}: the 'images' column holds {len(column)} image(s) but the messages have 0 image "
            "placeholders; add {'type': 'image'} parts where each image goes"
        )
    queue = iter(column)
    sources = [payload if origin == "part" else next(queue) for origin, payload in used]
    return ParsedExample(index, cleaned, None, sources, videos)
