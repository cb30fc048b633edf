"""Syntax checks for template text supplied by users (Jinja) and for Ollama Go templates."""
from __future__ import annotations

import re

_GO_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)
_GO_OPENERS = ("if ", "range ", "with ", "block ", "define ")


def check_jinja(text: str, name: str = "template") -> None:
    """Raise ``ValueError`` naming the line when ``text`` is not valid Jinja (transformers' settings)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"chat template {name!r} is empty")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"chat template {name!r} is not valid Jinja: {err.message} (line {err.lineno})") from err


def check_go_template(text: str, name: str = "template") -> None:
    """Raise ``ValueError`` when the ``{{ if }}/{{ range }}/{{ end }}`` blocks of a Go template do not balance."""
    depth = 0
    for action in _GO_ACTION.findall(text):
        if action.startswith(_GO_OPENERS):
            depth += 1
        elif action == "end":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Ollama template {name!r} has an unmatched {{{{ end }}}}")
    if depth:
        raise ValueError(f"Ollama template {name!r} leaves {depth} block(s) open")
    if text.count("{{") != text.count("}}"):
        raise ValueError(f"Ollama template {name!r} has unbalanced {{{{ }}}} delimiters")
