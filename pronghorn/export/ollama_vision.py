"""Ollama Modelfile pieces for vision-language models exported as text GGUF + mmproj.

Ollama takes a vision model as two ``FROM`` lines, the language model and the projector (a GGUF whose
architecture is "clip"). Images are not written by the TEMPLATE: Ollama puts each image of a message
into its ``.Content`` and llama.cpp's multimodal library wraps the image embeddings in the family's own
markers (``<|vision_start|>``/``<|vision_end|>`` for Qwen-VL, ``<start_of_image>``/``<end_of_image>``
for Gemma 3) -- the same tokens the processor's chat template places around its image placeholder.
The TEMPLATE therefore carries the turn format of the processor's chat template.
"""
from __future__ import annotations

import types

from pronghorn.data.templates.qwen import OLLAMA_CHATML_TURNS

# Qwen2-VL / Qwen2.5-VL processors' chat format: ChatML with a default system turn.
QWEN_VL_DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN_VL_OLLAMA_TEMPLATE = """\
{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system
""" + QWEN_VL_DEFAULT_SYSTEM + """<|im_end|>
{{ end }}
""" + OLLAMA_CHATML_TURNS
QWEN_VL_PIECES = (QWEN_VL_OLLAMA_TEMPLATE, ["<|im_end|>"], {"temperature": 0.7, "top_p": 0.8, "top_k": 20})

# model_type -> registered chat template name whose Ollama form is the family's turn format.
_REGISTERED_DEFAULTS = {"gemma3": "gemma-3"}
_OWN_DEFAULTS = {"qwen2_vl": QWEN_VL_PIECES, "qwen2_5_vl": QWEN_VL_PIECES}


def vision_ollama_pieces(processor, model_type: str, chat_template: str | None = None) -> tuple[str, list[str], dict]:
    """``(TEMPLATE, stops, params)`` for a VLM's Modelfile.

    Order: the registered ``chat_template`` named by the caller; else a registered template equal to the
    processor's chat template (one set with ``get_chat_template``); else the family's own format.
    """
    from pronghorn.export.ollama import ollama_pieces_for

    if chat_template is not None:
        return ollama_pieces_for(None, chat_template)
    jinja = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                  "chat_template", None)
    from pronghorn.data.chat_templates import template_entry_for

    if template_entry_for(types.SimpleNamespace(chat_template=jinja)) is not None:
        return ollama_pieces_for(types.SimpleNamespace(chat_template=jinja))
    if model_type in _OWN_DEFAULTS:
        template, stops, params = _OWN_DEFAULTS[model_type]
        return template, list(stops), dict(params)
    if model_type in _REGISTERED_DEFAULTS:
        return ollama_pieces_for(None, _REGISTERED_DEFAULTS[model_type])
    raise ValueError(f"no Ollama TEMPLATE is known for vision-language model_type {model_type!r}; pass "
                     "chat_template='<registered name>' or ollama=False")
