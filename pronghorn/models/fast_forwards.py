"""The generic fast decoder path: replacement forwards that read a FamilySpec.

Each function has the signature of the Hugging Face forward it replaces, plus the spec, and is
bound to one module instance by ``patching.py``. Sub-modules (projections, norms) are looked up
on every call, because PEFT wraps them after we patch.
"""
from __future__ import annotations

import sys

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from pronghorn.models.families import FamilySpec

# ---------------------------------------------------------------------------------------------- norms


def rms_norm_forward(self, hidden_states, *, spec: FamilySpec):
    from pronghorn.nn.norms import rms_norm_forward as fused_rms_norm

    return fused_rms_norm(self, hidden_states, offset=spec.norm_offset, cast_mode=spec.norm_cast)


def residual_norm_forward(self, hidden_states, *, spec: FamilySpec):
    """The norm after attention (``spec.residual_norm``); its input is the residual sum ``x + o_proj(attn)``.

    A checkpointed layer's forward parks that sum (:mod:`pronghorn.memory.stash`); its recompute, which skipped
    o_proj (see :func:`attention_forward`), reads it back here instead of the placeholder sum.
    """
    from pronghorn.memory.recompute import in_backward_recompute, with_value
    from pronghorn.memory.stash import current_stash

    stash = current_stash()
    if stash is not None and stash.residual:
        if not in_backward_recompute():
            stash.put("residual", [hidden_states])
        elif stash.has("residual"):
            hidden_states = with_value(hidden_states, stash.take("residual")[0])
    return rms_norm_forward(self, hidden_states, spec=spec)


# ------------------------------------------------------------------------------------------ attention


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                      *, spec: FamilySpec, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pronghorn.kernels.rope import apply_rope
    from pronghorn.nn.lora import fused_o_forward, fused_qkv_forward

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = fused_qkv_forward(self, hidden_states)
    query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
    if spec.qk_norm:
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rope(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)

    eager = getattr(sys.modules[type(self).__module__], "eager_attention_forward")
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    extra = {}
    # Per-layer windows live on the module (Qwen2/3, Gemma 2/3); whole-model ones on the config (Mistral, Phi-3).
    sliding = self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
    if sliding is not None:
        extra["sliding_window"] = sliding
    softcap = getattr(self, "attn_logit_softcapping", None)
    if softcap is not None:
        extra["softcap"] = softcap
    attn_output, attn_weights = interface(
        self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **extra, **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return fused_o_forward(self, attn_output, output_unused=_residual_parked(spec)), attn_weights


def _residual_parked(spec: FamilySpec) -> bool:
    """In a backward recompute, whether the layer's post-attention residual waits in its stash (the norm after
    attention will read it, so o_proj's output is never read)."""
    from pronghorn.memory.recompute import in_backward_recompute
    from pronghorn.memory.stash import current_stash

    if not (spec.attn_output_to_residual and in_backward_recompute()):
        return False
    stash = current_stash()
    return stash is not None and stash.residual and stash.has("residual")


# ------------------------------------------------------------------------------------------------ MLP


def mlp_forward(self, hidden_states, *, spec: FamilySpec):
    """Whole-MLP fused LoRA path when every projection qualifies; else the fused activation kernel."""
    from pronghorn.memory.recompute import in_backward_recompute
    from pronghorn.memory.stash import fetch_after_grad
    from pronghorn.nn.activations import mlp_forward as activation_mlp
    from pronghorn.nn.lora import fused_mlp_forward

    def unfused(x):
        return activation_mlp(self, x, activation=spec.activation, fused_gate_up=spec.fused_gate_up)

    recompute = in_backward_recompute()
    if recompute:
        fetch_after_grad(hidden_states)  # the previous layer's stash may come back once this MLP's backward is done
    output_unused = spec.mlp_output_to_residual and recompute
    return fused_mlp_forward(self, hidden_states, spec.activation, fallback=unfused, output_unused=output_unused,
                             stash=_gate_up_stash(recompute))


def _gate_up_stash(recompute: bool):
    """Where this MLP call hands its gate/up outputs to its layer's recompute, or takes them from (None: off)."""
    from pronghorn.kernels.lora.mlp import GateUpStash
    from pronghorn.memory.stash import current_stash

    stash = current_stash()
    if stash is None or not stash.mlp:
        return None
    if recompute:
        return GateUpStash(outputs=stash.take("mlp"))
    return GateUpStash(sink=lambda outs: stash.put("mlp", outs), into=getattr(stash, "gate_buffer", None))


# ---------------------------------------------------------------------------------------- LM head loss


_MULTIMODAL_PREFIXES = ("pixel_values", "image_", "video_", "input_features", "audio_", "token_type_ids")


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, *, original, **kwargs):
    """Training steps with labels compute the loss chunk by chunk from hidden states (logits never exist);
    everything else (evaluation, generation, inference mode) takes the model's own forward."""
    from pronghorn.memory.stash import begin_forward
    from pronghorn.nn.lora import begin_step

    begin_step()  # LoRA factors are cast once per step (forward, recompute and backward share them)
    begin_forward()  # layer positions for pronghorn.memory.stash restart
    shift_labels = kwargs.get("shift_labels")
    patch = getattr(self, "_pronghorn_patch", None)
    fused = (
        (labels is not None or shift_labels is not None) and self.training and torch.is_grad_enabled()
        and not (patch is not None and patch.inference)
        # MoE routers add an auxiliary loss inside the model's own forward: keep that forward
        and not getattr(self.config.get_text_config(), "output_router_logits", False)
        # images/audio/video go through the model's own body (the decoder alone would drop them)
        and not any(v is not None and k.startswith(_MULTIMODAL_PREFIXES) for k, v in kwargs.items())
    )
    if not fused:
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                        use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from pronghorn.nn.lm_head_loss import lm_head_loss, lm_head_spec_from_config
    from pronghorn.nn.positions import one_sequence_positions

    kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    if position_ids is None and attention_mask is None and past_key_values is None and not use_cache:
        # The positions the decoder would make, marked as unpacked so no one syncs to find that out.
        if inputs_embeds is not None:
            position_ids = one_sequence_positions(inputs_embeds.shape[1], inputs_embeds.device)
        else:
            position_ids = one_sequence_positions(input_ids.shape[1], input_ids.device)
    outputs = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                 use_cache=use_cache, **kwargs)
    loss = lm_head_loss(outputs.last_hidden_state, self.get_output_embeddings(),
                        labels=None if shift_labels is not None else labels, shift_labels=shift_labels,
                        num_items_in_batch=num_items_in_batch, spec=lm_head_spec_from_config(self.config))
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)
