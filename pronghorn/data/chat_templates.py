"""Putting a registered chat template on a tokenizer: template text, EOS, stop tokens, ShareGPT key mapping."""
from __future__ import annotations

import json
from typing import Mapping

from pronghorn.data.templates.registry import ChatTemplate, find_entry_for_jinja, get_template_entry

# Canonical role names and the ShareGPT spellings accepted for them.
ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool", "function_response": "tool",
}

_CANONICAL_MAPPING_KEYS = ("role", "content", "user", "assistant", "system", "tool")


def _resolve_entry(chat_template) -> ChatTemplate:
    if isinstance(chat_template, ChatTemplate):
        return chat_template
    if isinstance(chat_template, str):
        return get_template_entry(chat_template)
    raise TypeError(
        "chat_template must be a registered name (see pronghorn.data.list_chat_templates()) or a ChatTemplate "
        f"entry, got {type(chat_template).__name__}; register a custom Jinja template with register_chat_template"
    )


def _mapping_preamble(mapping: Mapping[str, str]) -> str:
    """Jinja that rewrites ShareGPT-keyed messages into role/content before the template proper runs."""
    unknown = set(mapping) - set(_CANONICAL_MAPPING_KEYS)
    if unknown:
        raise ValueError(
            f"mapping keys must be among {_CANONICAL_MAPPING_KEYS} (our names) with the dataset's names as values, "
            f"e.g. {{'role': 'from', 'content': 'value', 'user': 'human', 'assistant': 'gpt'}}; got {sorted(unknown)}"
        )
    role_key = mapping.get("role", "role")
    content_key = mapping.get("content", "content")
    roles = {mapping.get(name, name): name for name in ("user", "assistant", "system", "tool")}
    # json.dumps gives valid Jinja string/dict literals for these plain-string values.
    return (
        "{%- set pronghorn_map = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        f"{{%- set r = m[{json.dumps(role_key)}] -%}}"
        f"{{%- set pronghorn_map.messages = pronghorn_map.messages + [{{'role': {json.dumps(roles)}.get(r, r), "
        f"'content': m[{json.dumps(content_key)}]}}] -%}}"
        "{%- endfor -%}"
        "{%- set messages = pronghorn_map.messages -%}"
    )


def _single_token_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` when the vocabulary holds it as one token, else ``None``."""
    ids = tokenizer.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return int(tid)


def get_chat_template(tokenizer, chat_template="llama-3.1", mapping: Mapping[str, str] | None = None,
                      map_eos_token: bool = True):
    """Put a registered chat template on ``tokenizer`` and return the tokenizer.

    Args:
        tokenizer: a transformers tokenizer (modified in place and returned).
        chat_template: a name from :func:`list_chat_templates` (``"llama-3.1"``, ``"qwen-3"``, ``"chatml"``, ...)
            or a :class:`ChatTemplate` entry.
        mapping: ShareGPT key mapping, ``{"role": "from", "content": "value", "user": "human",
            "assistant": "gpt"}``, so conversations can be rendered without converting them first
            (:func:`standardize_sharegpt` converts them for good).
        map_eos_token: set ``tokenizer.eos_token`` to the token that ends an assistant turn (``<|eot_id|>``,
            ``<|im_end|>``, ``<end_of_turn>``, ...) so generation, GGUF and Ollama exports stop there.
    """
    entry = _resolve_entry(chat_template)
    jinja = entry.jinja
    if mapping:
        if dict(mapping) != {k: k for k in mapping}:
            jinja = _mapping_preamble(mapping) + jinja
    if map_eos_token and entry.eos_token is not None and entry.eos_token != tokenizer.eos_token:
        if _single_token_id(tokenizer, entry.eos_token) is None:
            raise ValueError(
                f"chat template {entry.name!r} ends assistant turns with {entry.eos_token!r}, which is not a single "
                f"token in this tokenizer's vocabulary, so it cannot become the EOS. Use the tokenizer of a "
                f"{entry.name} model, pass map_eos_token=False, or add the token first "
                f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{entry.eos_token!r}]}}) then "
                "model.resize_token_embeddings(len(tokenizer)))"
            )
        tokenizer.eos_token = entry.eos_token
    tokenizer.chat_template = jinja
    return tokenizer


def template_entry_for(tokenizer) -> ChatTemplate | None:
    """The registry entry whose template the tokenizer carries (mapping preamble ignored), or ``None``."""
    jinja = getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, dict):
        jinja = jinja.get("default")
    if not isinstance(jinja, str):
        return None
    if jinja.startswith("{%- set pronghorn_map"):
        jinja = jinja[jinja.index("{%- set messages = pronghorn_map.messages -%}") + len(
            "{%- set messages = pronghorn_map.messages -%}"):]
    return find_entry_for_jinja(jinja)


def get_stop_token_ids(tokenizer, chat_template=None) -> list[int]:
    """Token ids at which generation must stop: the tokenizer's EOS plus the template's single-token stops.

    ``chat_template`` defaults to the registered template the tokenizer carries.
    """
    entry = _resolve_entry(chat_template) if chat_template is not None else template_entry_for(tokenizer)
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for token in (entry.stop_tokens if entry else ()):
        tid = _single_token_id(tokenizer, token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def set_generation_stop_tokens(model, tokenizer, chat_template=None) -> list[int]:
    """Make ``model.generation_config`` stop on every stop token of the template; returns the ids set."""
    ids = get_stop_token_ids(tokenizer, chat_template)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the template no single-token stop; nothing to stop on")
    model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if getattr(model.generation_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids
