"""Reversible, per-instance patching of a loaded Hugging Face model with pronghorn's fast paths.

Nothing in transformers is edited: we rebind ``forward`` on module instances of this model only,
and record each change so ``unpatch_model`` restores the original behaviour exactly.
"""
from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass, field

from torch import nn

from pronghorn.models import fast_forwards as ff
from pronghorn.models.families import FamilySpec, spec_for

logger = logging.getLogger(__name__)


@dataclass
class PatchRecord:
    """What ``patch_model`` changed on one model; ``inference`` switches the loss path off for eval/generation."""

    spec: FamilySpec | None
    patched: list[tuple[nn.Module, str]] = field(default_factory=list)
    inference: bool = False
    # (sub-config, its attention implementation before) for towers routed to another attention function
    attention_routes: list[tuple[object, str | None]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, kind in self.patched:
            counts[kind] = counts.get(kind, 0) + 1
        if self.attention_routes:
            counts["vision_attention"] = len(self.attention_routes)
        return counts


def _bind(record: PatchRecord, module: nn.Module, kind: str, fn, **bound) -> None:
    if "forward" in module.__dict__:
        return  # already patched (or someone else's instance override): leave it alone

    # Keep the original signature visible: Trainer and generate() inspect forward's parameters.
    @functools.wraps(type(module).forward)
    def forward(self, *args, **kwargs):
        return fn(self, *args, **bound, **kwargs)

    module.forward = types.MethodType(forward, module)
    record.patched.append((module, kind))


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None


def _language_model(model: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, nn.Module) else model


def patch_model(model: nn.Module) -> PatchRecord:
    """Apply pronghorn's fast paths to ``model`` (a transformers causal LM) in place; returns the record.

    Supported families (see ``families.py``) get fused norms, RoPE, attention projections, MLP and the
    chunked LM-head loss; any other causal LM keeps its own layers and gets only the chunked loss.
    """
    existing = getattr(model, "_pronghorn_patch", None)
    if existing is not None:
        return existing
    spec = spec_for(model.config.get_text_config())
    record = PatchRecord(spec)
    if spec is not None:
        # Only the language model: a multimodal checkpoint's vision tower has modules of the same names
        # (self_attn, mlp, norms) whose math is not the text family's.
        for name, module in _language_model(model).named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if _is_rms_norm(module):
                residual = spec.attn_output_to_residual and leaf == spec.residual_norm
                _bind(record, module, "norm", ff.residual_norm_forward if residual else ff.rms_norm_forward,
                      spec=spec)
            elif leaf == "self_attn" and hasattr(module, "head_dim"):
                _bind(record, module, "attention", ff.attention_forward, spec=spec)
            elif leaf == "mlp" and (hasattr(module, "gate_proj") or hasattr(module, "gate_up_proj")):
                _bind(record, module, "mlp", ff.mlp_forward, spec=spec)
    if hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings"):
        from pronghorn.nn.positions import skip_known_packed_checks

        skip_known_packed_checks()
        original = model.forward
        _bind(record, model, "lm_head_loss", ff.causal_lm_forward, original=original)
    model._pronghorn_patch = record
    logger.info("pronghorn fast paths for %s (%s): %s", type(model).__name__,
                spec.name if spec else "generic: loss only", record.summary())
    return record


def unpatch_model(model: nn.Module) -> None:
    """Restore every forward that ``patch_model`` replaced on ``model``."""
    record = getattr(model, "_pronghorn_patch", None)
    if record is None:
        return
    for module, _ in record.patched:
        module.__dict__.pop("forward", None)
    for config, previous in record.attention_routes:
        config._attn_implementation_internal = previous
    del model._pronghorn_patch
    from pronghorn.nn.lora import end_steps

    end_steps()  # no later call may reuse LoRA casts made while the patch was on
