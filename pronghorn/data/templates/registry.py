"""The chat-template registry: one entry per chat format, with everything other layers need.

An entry carries the Jinja template (rendered by transformers' ``apply_chat_template``), the token
that ends an assistant turn (mapped onto the tokenizer's EOS so generation stops), every stop
string, the role markers used by responses-only masking, and the Ollama Modelfile pieces used by
the export layer. Built-in entries live in one module per model family; users add their own with
:func:`register_chat_template`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from pronghorn.data.templates import classic, gemma, llama, mistral, phi, qwen


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format.

    Attributes:
        name: registry key, e.g. ``"llama-3.1"``.
        jinja: the Jinja chat template (transformers conventions: ``messages``, ``add_generation_prompt``,
            ``bos_token``, ``eos_token``, ``tools``).
        eos_token: token that ends an assistant turn; ``None`` means "the tokenizer's own EOS" (alpaca-style
            templates that append ``eos_token``).
        stop_tokens: every string at which generation must stop (GGUF/Ollama ``stop`` parameters).
        response_part: text that opens an assistant turn (the generation prompt).
        instruction_part: text that opens a user turn.
        other_parts: texts that open other non-assistant turns (system, tool results); they end a response
            region and never carry loss.
        other_response_parts: further texts after which the assistant speaks (Mistral's ``[/TOOL_RESULTS]``).
        end_part: text that closes an assistant turn and carries loss (usually the stop token); ``None``
            when the template uses the tokenizer's EOS (resolved at use time).
        ollama_template: Ollama Modelfile ``TEMPLATE`` (Go template syntax).
        ollama_params: Modelfile ``PARAMETER`` sampling defaults for the family.
        tool_format: how tool calls are written, for :func:`pronghorn.data.parse_tool_calls`:
            ``"hermes"`` (``<tool_call>{json}</tool_call>``), ``"llama"`` (bare JSON with ``parameters``),
            ``"mistral"`` (``[TOOL_CALLS][...]``), ``"gemma"`` (Python call in a ``tool_code`` fence), or ``None``.
        aliases: other names that resolve to this entry.
        source: the published format this entry reproduces.
    """

    name: str
    jinja: str
    eos_token: str | None
    stop_tokens: tuple[str, ...]
    response_part: str
    instruction_part: str
    other_parts: tuple[str, ...] = ()
    other_response_parts: tuple[str, ...] = ()
    end_part: str | None = None
    ollama_template: str = ""
    ollama_params: Mapping[str, object] = field(default_factory=dict)
    tool_format: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = ""

    @property
    def supports_tools(self) -> bool:
        return self.tool_format is not None

    def end_part_for(self, tokenizer_eos: str | None) -> str | None:
        """The end-of-turn text for a tokenizer whose EOS is ``tokenizer_eos``."""
        return self.end_part if self.end_part is not None else tokenizer_eos


def _entry(spec: dict) -> ChatTemplate:
    spec = dict(spec)
    spec["stop_tokens"] = tuple(spec["stop_tokens"])
    spec["other_parts"] = tuple(spec.get("other_parts", ()))
    spec["other_response_parts"] = tuple(spec.get("other_response_parts", ()))
    spec["aliases"] = tuple(spec.get("aliases", ()))
    spec["ollama_params"] = MappingProxyType(dict(spec.get("ollama_params", {})))
    return ChatTemplate(**spec)


_BUILTIN_SPECS = (
    *llama.SPECS, *qwen.SPECS, *gemma.SPECS, *mistral.SPECS, *phi.SPECS, *classic.SPECS,
)
_BUILTIN = tuple(_entry(spec) for spec in _BUILTIN_SPECS)
# User registrations; looked up before built-ins so a user can override a built-in name on purpose.
_USER: dict[str, ChatTemplate] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _index() -> dict[str, ChatTemplate]:
    table: dict[str, ChatTemplate] = {}
    for entry in (*_BUILTIN, *_USER.values()):
        for name in (entry.name, *entry.aliases):
            table[_key(name)] = entry
    return table


def list_chat_templates(include_aliases: bool = False) -> list[str]:
    """Names of all registered chat templates, sorted; with ``include_aliases`` the aliases too."""
    names = set()
    for entry in (*_BUILTIN, *_USER.values()):
        names.add(entry.name)
        if include_aliases:
            names.update(entry.aliases)
    return sorted(names)


def get_template_entry(name: str) -> ChatTemplate:
    """The registry entry for ``name`` (or one of its aliases); raises ``KeyError`` listing valid names."""
    if not isinstance(name, str):
        raise TypeError(f"chat template name must be a string, got {type(name).__name__}")
    entry = _index().get(_key(name))
    if entry is None:
        raise KeyError(
            f"unknown chat template {name!r}; registered templates: {', '.join(list_chat_templates())} "
            "(add your own with pronghorn.data.register_chat_template)"
        )
    return entry


def register_chat_template(
    name: str,
    jinja: str,
    *,
    response_part: str,
    instruction_part: str,
    eos_token: str | None = None,
    stop_tokens=(),
    other_parts=(),
    end_part: str | None = None,
    ollama_template: str = "",
    ollama_params: Mapping[str, object] | None = None,
    tool_format: str | None = None,
    aliases=(),
    overwrite: bool = False,
) -> ChatTemplate:
    """Add a chat template to the registry and return its entry.

    Args:
        name: the name used with ``get_chat_template(tokenizer, chat_template=name)``.
        jinja: the Jinja template text.
        response_part: text that opens an assistant turn (also the generation prompt).
        instruction_part: text that opens a user turn.
        eos_token: token ending an assistant turn; ``None`` keeps the tokenizer's EOS.
        stop_tokens: stop strings for generation/export (``eos_token`` is added when missing).
        other_parts: texts opening system/tool turns (never trained on).
        end_part: text closing an assistant turn (trained on); defaults to ``eos_token``.
        ollama_template / ollama_params: Modelfile pieces for export.
        tool_format: one of ``"hermes"``, ``"llama"``, ``"mistral"``, ``"gemma"`` or ``None``.
        aliases: extra names.
        overwrite: allow replacing an existing name (built-ins included).
    """
    from pronghorn.data.templates.validate import check_jinja

    if not response_part or not instruction_part:
        raise ValueError("register_chat_template needs a non-empty response_part and instruction_part")
    if tool_format not in (None, "hermes", "llama", "mistral", "gemma"):
        raise ValueError(f"tool_format must be None, 'hermes', 'llama', 'mistral' or 'gemma', got {tool_format!r}")
    check_jinja(jinja, name)
    taken = _index()
    for n in (name, *aliases):
        if _key(n) in taken and not overwrite:
            raise ValueError(f"chat template name {n!r} is already registered; pass overwrite=True to replace it")
    stops = tuple(stop_tokens)
    if eos_token is not None and eos_token not in stops:
        stops = (eos_token, *stops)
    entry = _entry(dict(
        name=name, jinja=jinja, eos_token=eos_token, stop_tokens=stops, response_part=response_part,
        instruction_part=instruction_part, other_parts=other_parts,
        end_part=end_part if end_part is not None else eos_token,
        ollama_template=ollama_template, ollama_params=ollama_params or {}, tool_format=tool_format,
        aliases=aliases, source="user registered",
    ))
    _USER[_key(name)] = entry
    return entry


def unregister_chat_template(name: str) -> None:
    """Remove a user-registered template (built-ins cannot be removed)."""
    if _key(name) not in _USER:
        raise KeyError(f"{name!r} is not a user-registered chat template")
    del _USER[_key(name)]


def find_entry_for_jinja(jinja: str | None) -> ChatTemplate | None:
    """The registry entry whose template text is exactly ``jinja`` (``None`` when none is)."""
    if not jinja:
        return None
    for entry in (*_USER.values(), *_BUILTIN):
        if entry.jinja == jinja:
            return entry
    return None


def ollama_template(name: str) -> tuple[str, list[str], dict]:
    """Ollama Modelfile pieces for template ``name``: ``(TEMPLATE string, stop list, PARAMETER dict)``."""
    entry = get_template_entry(name)
    if not entry.ollama_template:
        raise ValueError(f"chat template {entry.name!r} has no Ollama TEMPLATE; register one with ollama_template=")
    return entry.ollama_template, list(entry.stop_tokens), dict(entry.ollama_params)
