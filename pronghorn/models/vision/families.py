"""Vision-language families, declared by where their parts live and which fast paths are exact for them.

A spec names the vision tower, the projector and the language model as attribute paths under the
model's body (``model.model`` in transformers 5), the language model's text family (from
``pronghorn.models.families``) and which of its fast paths compute the same math as Hugging Face's
forward. Any other ``AutoModelForImageTextToText`` gets a spec decided from the loaded model's structure
(:func:`vision_spec_for_model`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from pronghorn.models import families as text_families

# Modules 4-bit loading leaves in 16-bit whatever the family: the output layer and any multimodal projector.
_ALWAYS_SKIP = ("lm_head", "multi_modal_projector")


@dataclass(frozen=True)
class VisionFamilySpec:
    """Where a VLM's parts live and which language-model fast paths are exact for it.

    Attributes:
        vision: attribute paths (under the model body) of the vision tower.
        projector: attribute paths of the vision-to-text projector (may lie inside the vision tower).
        language: attribute path of the language model.
        text_family: the text family whose kernels the language model's norms / MLPs / attention can use.
        fast_attention: False where the attention differs from the text family's (multimodal RoPE, cross
            attention), so it keeps Hugging Face's forward while norms and MLPs still get kernels.
        fused_loss: the class's forward is ``body(...) -> lm_head -> loss``, so the chunked LM-head loss is exact.
        packed_vision_tower: the vision tower packs all images into one stream with ``cu_seqlens`` and takes one
            varlen attention call for it under a "flash" implementation (``pronghorn.nn.vision_attention``).
        quant_skip: module-name fragments 4-bit/8-bit loading must not quantize (patch embedding, projector).
    """

    name: str
    model_types: tuple[str, ...]
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: str = "language_model"
    text_family: text_families.FamilySpec | None = None
    fast_attention: bool = False
    fused_loss: bool = True
    packed_vision_tower: bool = False
    quant_skip: tuple[str, ...] = ()

    def skip_modules(self) -> list[str]:
        return _skip_patterns(set(_ALWAYS_SKIP) | set(self.quant_skip) | set(self.projector))


def _skip_patterns(fragments) -> list[str]:
    """transformers matches ``llm_int8_skip_modules`` entries from the start of a module's full name (as a
    regex, up to a module boundary) or as its suffix; a leading ``.*`` lets a fragment sit at any depth."""
    return sorted(".*" + re.escape(fragment) for fragment in fragments)


QWEN2_VL = VisionFamilySpec(
    "qwen2_vl", ("qwen2_vl",), vision=("visual",), projector=("visual.merger",), text_family=text_families.QWEN2,
    packed_vision_tower=True, quant_skip=("visual.patch_embed", "visual.merger"),
)
QWEN2_5_VL = VisionFamilySpec(
    "qwen2_5_vl", ("qwen2_5_vl",), vision=("visual",), projector=("visual.merger",),
    text_family=text_families.QWEN2, packed_vision_tower=True, quant_skip=("visual.patch_embed", "visual.merger"),
)
QWEN3_VL = VisionFamilySpec(
    "qwen3_vl", ("qwen3_vl",), vision=("visual",), projector=("visual.merger", "visual.deepstack_merger_list"),
    text_family=text_families.QWEN3, packed_vision_tower=True,
    quant_skip=("visual.patch_embed", "visual.merger", "deepstack_merger_list"),
)
GEMMA3_VL = VisionFamilySpec(
    "gemma3", ("gemma3",), vision=("vision_tower",), projector=("multi_modal_projector",),
    text_family=text_families.GEMMA3, fast_attention=True, quant_skip=("vision_tower.embeddings",),
)
MLLAMA = VisionFamilySpec(
    # Cross-attention layers interleave with self-attention ones: attention keeps HF's forward.
    "mllama", ("mllama",), vision=("vision_model",), projector=("multi_modal_projector",),
    text_family=text_families.LLAMA, quant_skip=("vision_model.patch_embedding", "vision_model.gated_positional"),
)
LLAVA = VisionFamilySpec(
    # The text family is read from the checkpoint's text config (Llama, Mistral, Qwen2, ...).
    "llava", ("llava",), vision=("vision_tower",), projector=("multi_modal_projector",), fast_attention=True,
    quant_skip=("patch_embedding", "patch_conv"),
)
MISTRAL3 = VisionFamilySpec(
    "mistral3", ("mistral3",), vision=("vision_tower",), projector=("multi_modal_projector",),
    text_family=text_families.MISTRAL, fast_attention=True, quant_skip=("patch_conv",),
)

VISION_FAMILIES: tuple[VisionFamilySpec, ...] = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, GEMMA3_VL, MLLAMA, LLAVA, MISTRAL3)
_BY_MODEL_TYPE = {mt: spec for spec in VISION_FAMILIES for mt in spec.model_types}

# Fragments that mark parts of an unknown VLM, matched against child attribute names and class names.
_VISION_HINTS = re.compile(r"vision|visual|image_encoder|vit\b|siglip|clip", re.IGNORECASE)
_PROJECTOR_HINTS = re.compile(r"projector|merger|connector|adapter|mm_proj|resampler", re.IGNORECASE)
_GENERIC_SKIP = ("patch_embed", "patch_embedding", "patch_conv", "multi_modal_projector", "merger", "connector",
                 "mm_projector")


def vision_spec_for_config(config) -> VisionFamilySpec | None:
    """The declared spec for a VLM config (by ``model_type``), or None for families without one."""
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def quant_skip_modules(config) -> list[str]:
    """Module-name fragments that 4-bit/8-bit loading must leave unquantized, decided before loading."""
    spec = vision_spec_for_config(config)
    if spec is not None:
        return spec.skip_modules()
    return _skip_patterns(set(_ALWAYS_SKIP) | set(_GENERIC_SKIP))


def model_body(model: nn.Module) -> nn.Module:
    """The module holding the vision tower and the language model (``model.model`` in transformers 5)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", None)
    return body if isinstance(body, nn.Module) else base


def _generic_spec(model: nn.Module) -> VisionFamilySpec:
    body = model_body(model)
    language = None
    get_decoder = getattr(body, "get_decoder", None) or getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    vision, projector = [], []
    for name, child in body.named_children():
        if decoder is not None and child is decoder:
            language = name
        elif _PROJECTOR_HINTS.search(name) or _PROJECTOR_HINTS.search(type(child).__name__):
            projector.append(name)
        elif _VISION_HINTS.search(name) or _VISION_HINTS.search(type(child).__name__):
            vision.append(name)
    if language is None or not vision:
        children = [f"{n} ({type(c).__name__})" for n, c in body.named_children()]
        raise ValueError(
            f"cannot tell the vision tower and language model apart in {type(model).__name__} (children of its body: "
            f"{children}); this model type ({getattr(model.config, 'model_type', '?')}) has no declared vision "
            "spec. Pass target_modules explicitly to get_peft_model, or add a VisionFamilySpec."
        )
    text_config = model.config.get_text_config()
    return VisionFamilySpec(
        f"generic:{getattr(model.config, 'model_type', '?')}", (getattr(model.config, "model_type", ""),),
        vision=tuple(vision), projector=tuple(projector), language=language,
        text_family=text_families.spec_for(text_config), fast_attention=False, fused_loss=False,
        quant_skip=_GENERIC_SKIP,
    )


def vision_spec_for_model(model: nn.Module) -> VisionFamilySpec:
    """The spec for a loaded VLM: the declared one for its model type, else one read from its structure.

    For declared families whose text model varies by checkpoint (Llava), the text family is read from the
    text config; a text family is only used when the language model's activation matches it.
    """
    config = model.config
    spec = vision_spec_for_config(config)
    if spec is None:
        return _generic_spec(model)
    text_config = config.get_text_config()
    family = spec.text_family or text_families.spec_for(text_config)
    if family is not None and not _activation_matches(family, text_config):
        family = None
    if family is not spec.text_family:
        spec = VisionFamilySpec(**{**spec.__dict__, "text_family": family})
    return spec


_ACTIVATIONS = {"swiglu": ("silu", "swish"), "geglu_tanh": ("gelu_pytorch_tanh", "gelu_tanh"),
                "geglu_exact": ("gelu",)}


def _activation_matches(family: text_families.FamilySpec, text_config) -> bool:
    act = getattr(text_config, "hidden_act", None) or getattr(text_config, "hidden_activation", None)
    return act in _ACTIVATIONS.get(family.activation, ())


def resolve_paths(model: nn.Module, paths: tuple[str, ...]) -> list[str]:
    """Full module names (as ``named_modules`` spells them on ``model``) of attribute ``paths`` under the body."""
    body = model_body(model)
    wanted = {}
    for path in paths:
        module = body
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module):
            wanted[id(module)] = path
    return [name for name, module in model.named_modules() if id(module) in wanted]
