"""pronghorn's fast paths on a VLM's language model, where the math is the same as Hugging Face's.

Inside the language model only: RMSNorms and gated MLPs get the text family's kernels; attention gets the
fused path only where the family's attention is the text family's (not multimodal RoPE, not cross
attention). The whole model gets the chunked LM-head loss where its forward is ``body -> lm_head -> loss``
(declared per family), so vision features still flow through the model's own body. The changes are
recorded in the same ``PatchRecord`` as text models', so ``unpatch_model``, ``for_inference`` and
pronghorn's SFTTrainer handle VLMs unchanged. Vision towers that pack all images into one stream
(declared per family) get one varlen attention call per layer instead of one per image or window.
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from pronghorn.models import fast_forwards as ff
from pronghorn.models.patching import PatchRecord, _bind, _is_rms_norm
from pronghorn.models.vision.families import (
    VisionFamilySpec,
    model_body,
    resolve_paths,
    vision_spec_for_model,
)

logger = logging.getLogger(__name__)


def patch_vision_model(model: nn.Module, spec: VisionFamilySpec | None = None) -> PatchRecord:
    """Apply the exact fast paths to ``model`` (a transformers VLM) in place; returns the record.

    ``pronghorn.unpatch_model(model)`` undoes it.
    """
    existing = getattr(model, "_pronghorn_patch", None)
    if existing is not None:
        return existing
    spec = spec or vision_spec_for_model(model)
    family = spec.text_family
    record = PatchRecord(family)
    language = resolve_paths(model, (spec.language,))
    if family is not None and language:
        lm = model.get_submodule(language[0])
        for name, module in lm.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if _is_rms_norm(module):
                _bind(record, module, "norm", ff.rms_norm_forward, spec=family)
            elif leaf == "self_attn" and spec.fast_attention and hasattr(module, "head_dim"):
                _bind(record, module, "attention", ff.attention_forward, spec=family)
            elif leaf == "mlp" and (hasattr(module, "gate_proj") or hasattr(module, "gate_up_proj")):
                _bind(record, module, "mlp", ff.mlp_forward, spec=family)
    if spec.packed_vision_tower:
        _route_vision_towers(model, spec, record)
    if spec.fused_loss and model_body(model) is not model and hasattr(model, "get_output_embeddings"):
        original = model.forward
        _bind(record, model, "lm_head_loss", vision_lm_forward, original=original)
    model._pronghorn_patch = record
    model._pronghorn_vision_spec = spec
    logger.info("pronghorn fast paths for %s (%s, language model: %s): %s", type(model).__name__, spec.name,
                family.name if family else "no kernels", record.summary())
    return record


def _route_vision_towers(model: nn.Module, spec: VisionFamilySpec, record: PatchRecord) -> None:
    from pronghorn.nn.vision_attention import route_vision_attention

    configs = {id(c): c for c in (model.get_submodule(p).config for p in resolve_paths(model, spec.vision))}
    for config in configs.values():
        previous = route_vision_attention(config)
        if config._attn_implementation != previous:
            record.attention_routes.append((config, previous))


_LOSS_ONLY_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict")


def vision_lm_forward(self, *args, original, **kwargs):
    """Training steps with labels: the model body (vision tower, projector, language model) runs as in
    Hugging Face's forward, then the loss is computed chunk by chunk from its hidden states, so the
    ``[tokens, vocab]`` logits never exist. Everything else takes the model's own forward."""
    labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
    patch = getattr(self, "_pronghorn_patch", None)
    fused = (
        not args and (labels is not None or shift_labels is not None) and self.training and torch.is_grad_enabled()
        and not (patch is not None and patch.inference)
        and not getattr(self.config.get_text_config(), "output_router_logits", False)
    )
    if not fused:
        return original(*args, **kwargs)
    from pronghorn.nn.lm_head_loss import lm_head_loss, lm_head_spec_from_config

    num_items_in_batch = kwargs.get("num_items_in_batch")
    body_kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY_KWARGS}
    body = self.model
    if "labels" in inspect.signature(body.forward).parameters:
        body_kwargs["labels"] = labels  # some bodies build their attention mask differently when training
    outputs = body(**body_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    loss = lm_head_loss(hidden, self.get_output_embeddings(),
                        labels=None if shift_labels is not None else labels, shift_labels=shift_labels,
                        num_items_in_batch=num_items_in_batch, spec=lm_head_spec_from_config(self.config))
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))
