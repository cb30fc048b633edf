"""Ollama Modelfiles whose TEMPLATE, stop words and sampling defaults match the training chat template.

The Modelfile writer takes the pieces explicitly ``(template, stops, params)``; where they come from
is one function, :func:`ollama_pieces_for`, which finds the registered chat template the tokenizer
carries and asks the chat-template registry (``pronghorn.data``) for its Ollama form.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


def _quote(text: str) -> str:
    # Modelfile triple-quoted strings cannot contain a triple quote; none of the known templates do.
    if '"""' in text:
        raise ValueError('an Ollama TEMPLATE/SYSTEM may not contain \'"""\'')
    return f'"""{text}"""'


def _param_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _from_line(path: str) -> str:
    return f"FROM ./{path}" if not os.path.isabs(path) else f"FROM {path}"


def modelfile_text(gguf_file: str, template: str, stops: list[str], params: Mapping[str, object] | None = None,
                   system: str | None = None, projector: str | None = None) -> str:
    """The text of a Modelfile that runs ``gguf_file`` (a path relative to the Modelfile) with this template.

    ``projector`` names a vision projector GGUF (mmproj) for a vision-language model; Ollama takes it as a
    second ``FROM`` line.
    """
    lines = [_from_line(gguf_file)]
    if projector:
        lines.append(_from_line(projector))
    lines.append("")
    lines.append(f"TEMPLATE {_quote(template)}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines.append("")
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    for key, value in (params or {}).items():
        if key == "stop":
            continue
        lines.append(f"PARAMETER {key} {_param_value(value)}")
    return "\n".join(lines) + "\n"


def write_modelfile(directory: str | os.PathLike, gguf_file: str, template: str, stops: list[str],
                    params: Mapping[str, object] | None = None, system: str | None = None,
                    filename: str = "Modelfile", projector: str | None = None) -> Path:
    """Write a Modelfile beside ``gguf_file`` (and the ``projector`` mmproj, if any) in ``directory``."""
    path = Path(directory) / filename
    path.write_text(modelfile_text(gguf_file, template, stops, params, system, projector=projector))
    return path


def chat_template_name(tokenizer) -> str | None:
    """Registered name of the chat template ``tokenizer`` carries, or ``None`` if it carries another one."""
    from pronghorn.data.chat_templates import template_entry_for

    entry = template_entry_for(tokenizer)
    return entry.name if entry is not None else None


def _registry_ollama_template(name: str) -> tuple[str, list[str], dict]:
    try:
        from pronghorn.data import ollama_template
    except ImportError:
        from pronghorn.data.templates.registry import ollama_template
    return ollama_template(name)


def ollama_pieces_for(tokenizer, chat_template: str | None = None) -> tuple[str, list[str], dict]:
    """``(TEMPLATE, stops, params)`` for the tokenizer's chat template (or the registered ``chat_template``).

    Args:
        tokenizer: the tokenizer used in training; its chat template picks the registry entry, and its EOS
            text is written into templates of formats that end turns with the tokenizer's own EOS
            (alpaca, vicuna, zephyr).
        chat_template: a registered template name, overriding detection from the tokenizer.

    Raises a clear error when the tokenizer's template is not a registered one: an Ollama template
    cannot be derived from arbitrary Jinja, and a wrong one would silently change the prompt format.
    """
    from pronghorn.data.templates import OLLAMA_EOS

    name = chat_template or chat_template_name(tokenizer)
    if name is None:
        raise ValueError("the tokenizer's chat template is not one of pronghorn's registered templates, so no "
                         "matching Ollama TEMPLATE is known. Pass chat_template='<name>' (see "
                         "pronghorn.data.list_chat_templates()), or write_modelfile(...) with your own template, "
                         "or ollama=False to skip the Modelfile")
    template, stops, params = _registry_ollama_template(name)
    if OLLAMA_EOS in template:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise ValueError(f"chat template {name!r} ends assistant turns with the tokenizer's EOS, but the "
                             "tokenizer has no eos_token; set tokenizer.eos_token to the text that ends a turn")
        template = template.replace(OLLAMA_EOS, eos)
    return template, stops, params
