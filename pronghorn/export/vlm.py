"""Vision-language models in export: which weights belong to the language model and which to vision.

transformers 5 lays every ``*ForConditionalGeneration`` VLM out the same way: the decoder under
``model.language_model``, the vision encoder and projector beside it under ``model`` (``model.visual``,
``model.vision_tower``, ``model.multi_modal_projector``, ...) and ``lm_head`` at the top. A merged
16-bit checkpoint keeps these names (that is what ``from_pretrained`` reads back); GGUF needs the two
halves apart: the language model becomes an ordinary text GGUF (its weights renamed to the causal-LM
layout, ``model.layers.*``), the rest goes to the vision projector file.
"""
from __future__ import annotations

import dataclasses

from pronghorn.export.merge import MergePlan, TensorSource

LANGUAGE_PREFIX = "model.language_model."


def is_vision_language(config) -> bool:
    """True for a composite vision-language config (one with both ``text_config`` and ``vision_config``)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def text_config_of(config):
    """The language model's config of a VLM (``config.text_config``), or ``config`` itself for a text model."""
    return config.text_config if is_vision_language(config) else config


def vision_module_prefixes(plan: MergePlan) -> list[str]:
    """Top-level module prefixes holding vision weights (e.g. ``["model.visual."]``), from the plan's names."""
    prefixes: list[str] = []
    for src in plan.sources:
        if src.name.startswith(LANGUAGE_PREFIX) or src.name.startswith("lm_head."):
            continue
        parts = src.name.split(".")
        prefix = ".".join(parts[:2]) + "." if parts[0] == "model" else parts[0] + "."
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


@dataclasses.dataclass
class VLMParts:
    """A VLM merge plan split into a text-model plan and the vision tensors."""

    text: MergePlan                 # sources renamed to the causal-LM layout, config = text_config
    vision: list[TensorSource]      # names relative to ``model.`` (``visual.blocks.0...``)


def _renamed(src: TensorSource, name: str) -> TensorSource:
    return dataclasses.replace(src, name=name)


def split_vlm_plan(plan: MergePlan) -> VLMParts:
    """Split ``plan`` of a vision-language model into its language-model and vision parts.

    Raises a clear error when the model does not follow transformers 5's layout, rather than guessing
    which tensors are vision ones.
    """
    if not is_vision_language(plan.config):
        raise ValueError(f"model_type {getattr(plan.config, 'model_type', None)!r} is not a vision-language model "
                         "(its config has no text_config/vision_config)")
    text_sources: list[TensorSource] = []
    vision: list[TensorSource] = []
    for src in plan.sources:
        if src.name.startswith(LANGUAGE_PREFIX):
            text_sources.append(_renamed(src, "model." + src.name[len(LANGUAGE_PREFIX):]))
        elif src.name.startswith("lm_head."):
            text_sources.append(src)
        elif src.name.startswith("model."):
            vision.append(_renamed(src, src.name[len("model."):]))
        else:
            raise NotImplementedError(f"tensor {src.name!r} of {type(plan.base_model).__name__} is neither under "
                                      f"{LANGUAGE_PREFIX!r} nor under 'model.'; this VLM layout (transformers < 5 or a "
                                      "custom model) is not supported for GGUF export")
    if not text_sources or not vision:
        raise NotImplementedError(f"{type(plan.base_model).__name__}: found {len(text_sources)} language-model and "
                                  f"{len(vision)} vision tensors; expected both under transformers 5's layout "
                                  f"({LANGUAGE_PREFIX!r} and 'model.<vision module>.')")
    text = dataclasses.replace(plan, sources=text_sources, config=plan.config.text_config)
    return VLMParts(text=text, vision=vision)
