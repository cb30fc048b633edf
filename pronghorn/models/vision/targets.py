"""Which linear layers of a VLM get LoRA adapters, from Unsloth's ``finetune_*`` switches.

Every linear layer is placed in one part (vision tower, projector, language model; the output layer is
never adapted) and one kind (attention, MLP) by its module path. The choice becomes one regular
expression over full module names, which PEFT matches with ``re.fullmatch`` and saves in the adapter
config, so a reloaded adapter targets exactly the same layers.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from pronghorn.config.validation import ConfigError
from pronghorn.models.lora_setup import _is_linear
from pronghorn.models.vision.families import VisionFamilySpec, resolve_paths

logger = logging.getLogger(__name__)

_ATTENTION_SEGMENTS = {"attn", "self_attn", "attention", "cross_attn", "self_attention", "cross_attention"}
_MLP_SEGMENTS = {"mlp", "feed_forward", "ffn", "ff", "mlp_block"}


@dataclass(frozen=True)
class LinearLayer:
    name: str  # full module name
    part: str  # "vision" | "projector" | "language" | "other"
    kind: str  # "attention" | "mlp" | "other"


def _kind(name: str, part: str) -> str:
    segments = set(name.split(".")[:-1])
    if segments & _ATTENTION_SEGMENTS:
        return "attention"
    if segments & _MLP_SEGMENTS or part == "projector":
        return "mlp"  # a projector is a small MLP between the towers
    return "other"


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def classify_linear_layers(model: nn.Module, spec: VisionFamilySpec) -> list[LinearLayer]:
    """Every LoRA-able linear layer of ``model`` with its part and kind."""
    projector = resolve_paths(model, spec.projector)
    vision = resolve_paths(model, spec.vision)
    language = resolve_paths(model, (spec.language,))
    layers = []
    for name, module in model.named_modules():
        if not _is_linear(module) or name.endswith("lm_head"):
            continue
        if _under(name, projector):
            part = "projector"
        elif _under(name, vision):
            part = "vision"
        elif _under(name, language):
            part = "language"
        else:
            part = "other"
        layers.append(LinearLayer(name, part, _kind(name, part)))
    return layers


def select_lora_targets(model: nn.Module, spec: VisionFamilySpec, *, finetune_vision_layers: bool,
                        finetune_language_layers: bool, finetune_attention_modules: bool,
                        finetune_mlp_modules: bool) -> tuple[str, list[LinearLayer]]:
    """A ``target_modules`` regex for the chosen parts and kinds, and the layers it selects.

    The projector is adapted with the vision layers' MLPs (it is an MLP from vision to text features).
    Layers that are neither attention nor MLP (rare) follow their part's switch when both kinds are on.
    """
    if not (finetune_vision_layers or finetune_language_layers):
        raise ConfigError("finetune_vision_layers=False and finetune_language_layers=False leave nothing to "
                          "train; enable at least one")
    if not (finetune_attention_modules or finetune_mlp_modules):
        raise ConfigError("finetune_attention_modules=False and finetune_mlp_modules=False leave nothing to "
                          "train; enable at least one")
    parts = set()
    if finetune_vision_layers:
        parts |= {"vision", "projector"}
    if finetune_language_layers:
        parts.add("language")
    kinds = set()
    if finetune_attention_modules:
        kinds.add("attention")
    if finetune_mlp_modules:
        kinds.add("mlp")
    if finetune_attention_modules and finetune_mlp_modules:
        kinds.add("other")
    layers = classify_linear_layers(model, spec)
    chosen = [layer for layer in layers if layer.part in parts and layer.kind in kinds]
    if not chosen:
        seen = sorted({(layer.part, layer.kind) for layer in layers})
        raise ConfigError(f"the finetune_* switches select no linear layer of this {type(model).__name__} "
                          f"(its layers by (part, kind): {seen}); pass target_modules explicitly")
    regex = _regex_for(chosen)
    counts: dict[str, int] = {}
    for layer in chosen:
        counts[f"{layer.part}/{layer.kind}"] = counts.get(f"{layer.part}/{layer.kind}", 0) + 1
    logger.info("LoRA targets (%s): %s", spec.name, counts)
    return regex, chosen


def _regex_for(layers: list[LinearLayer]) -> str:
    """A fullmatch regex naming the chosen layers, with layer indices (numbered segments
    followed by more path) generalised to ``\\d+``: layers that differ only by index share part and kind."""
    patterns = sorted({re.sub(r"\\\.\d+(?=\\\.)", r"\\.\\d+", re.escape(layer.name)) for layer in layers})
    return "(?:" + "|".join(patterns) + ")"
