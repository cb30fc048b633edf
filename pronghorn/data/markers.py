"""Which text opens and closes an assistant turn, from the registry or by probing the chat template.

Probing renders a small conversation with sentinel contents and reads the markers around them:
the generation prompt is the response part; what follows the last assistant content is the end-of-turn
part; what sits between an assistant answer and the next user message, minus the end-of-turn part,
is the instruction part.
"""
from __future__ import annotations

from dataclasses import dataclass

from pronghorn.data.chat_templates import template_entry_for

_U1, _A1, _U2, _A2 = "qzxuserone", "qzxassistantone", "qzxusertwo", "qzxassistanttwo"


@dataclass(frozen=True)
class ResponseParts:
    """Markers used by responses-only masking.

    Any of ``response_parts`` opens an assistant turn (the first is the generation prompt); any of
    ``instruction_parts`` (user, system, tool openers) ends it; ``end_part`` (when set) closes it and is
    itself trained on.
    """

    response_parts: tuple[str, ...]
    instruction_parts: tuple[str, ...]
    end_part: str | None
    origin: str

    @property
    def response_part(self) -> str:
        return self.response_parts[0]

    def describe(self) -> str:
        shown = self.response_part if len(self.response_parts) == 1 else list(self.response_parts)
        return (f"response_part={shown!r}, instruction_part={self.instruction_parts[0]!r}"
                + (f", other parts {list(self.instruction_parts[1:])!r}" if len(self.instruction_parts) > 1 else "")
                + f", end_part={self.end_part!r} ({self.origin})")


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def probe_parts(tokenizer) -> ResponseParts:
    """Derive the markers from ``tokenizer.chat_template`` by rendering a probe conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "cannot derive instruction_part/response_part: the tokenizer has no chat template. Pass them "
            "explicitly, or put a template on it first with pronghorn.data.get_chat_template(tokenizer, name)"
        )
    conv = [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
            {"role": "user", "content": _U2}, {"role": "assistant", "content": _A2}]
    text = _render(tokenizer, conv)
    positions = [text.find(s) for s in (_U1, _A1, _U2, _A2)]
    if min(positions) < 0 or positions != sorted(positions):
        raise ValueError(
            "cannot derive the response markers: the tokenizer's chat template does not render a plain "
            f"user/assistant conversation verbatim (got {text[:300]!r}); pass instruction_part and response_part"
        )
    u1, a1, u2, a2 = positions
    with_prompt = _render(tokenizer, conv[:1], add_generation_prompt=True)
    without = _render(tokenizer, conv[:1])
    if with_prompt.startswith(without) and len(with_prompt) > len(without):
        response = with_prompt[len(without):]
    else:
        response = text[u1 + len(_U1):a1].strip()
    tail = text[a2 + len(_A2):]
    end = tail.strip() or None
    if end is not None and not text[a1 + len(_A1):].startswith(tail.rstrip()):
        end = None  # the last turn ends differently from the others: rely on the next marker instead
    between = text[a1 + len(_A1):u2]
    if end and between.startswith(end):
        between = between[len(end):]
    instruction = between.strip()
    if not instruction or not response.strip():
        raise ValueError(
            f"cannot derive the response markers from the chat template (assistant opener {response!r}, user "
            f"opener {instruction!r}); pass instruction_part and response_part"
        )
    if response not in text[u1:a1]:
        response = response.strip()
    return ResponseParts((response,), (instruction,), end, "probed from the tokenizer's chat template")


def resolve_parts(tokenizer, instruction_part=None, response_part=None, end_part=None) -> ResponseParts:
    """Markers to use: explicit arguments first, then the registry entry of the tokenizer's template, then a probe.

    ``instruction_part`` may be a string or a list of strings (every opener of a non-assistant turn);
    ``response_part`` too (every text after which the assistant speaks).
    ``end_part=None`` takes the end-of-turn text from the template when one is known; ``end_part=False``
    disables it (a response then runs until the next instruction part).
    """
    entry = template_entry_for(tokenizer)
    detected: ResponseParts | None = None
    if entry is not None:
        detected = ResponseParts((entry.response_part, *entry.other_response_parts),
                                 (entry.instruction_part, *entry.other_parts),
                                 entry.end_part_for(tokenizer.eos_token), f"registered template {entry.name!r}")
    elif (instruction_part is None or response_part is None or end_part is None) and \
            getattr(tokenizer, "chat_template", None):
        try:
            detected = probe_parts(tokenizer)
        except ValueError:
            if instruction_part is None or response_part is None:
                raise
    if (instruction_part is None) != (response_part is None):
        raise ValueError("pass both instruction_part and response_part, or neither (to derive them from the template)")
    if instruction_part is None:
        if detected is None:
            probe_parts(tokenizer)  # raises the explanatory error
        parts, origin = detected, detected.origin
    else:
        instruction_part = (instruction_part,) if isinstance(instruction_part, str) else tuple(instruction_part)
        response_part = (response_part,) if isinstance(response_part, str) else tuple(response_part)
        if not response_part or not instruction_part or not all(
                isinstance(p, str) and p for p in (*instruction_part, *response_part)):
            raise ValueError("instruction_part and response_part must be non-empty strings (or lists of them)")
        both = set(response_part) & set(instruction_part)
        if both:
            raise ValueError(f"response_part {sorted(both)!r} is also an instruction part")
        parts = ResponseParts(response_part, instruction_part, detected.end_part if detected else None, "given")
        origin = "given" + (f"; end_part from {detected.origin}" if detected and end_part is None else "")
    if end_part is False:
        final_end = None
    elif end_part is None:
        final_end = parts.end_part
    elif isinstance(end_part, str) and end_part:
        final_end = end_part
    else:
        raise ValueError(f"end_part must be a non-empty string, None (auto) or False (none), got {end_part!r}")
    return ResponseParts(parts.response_parts, parts.instruction_parts, final_end, origin)
