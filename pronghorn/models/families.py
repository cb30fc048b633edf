"""Architecture families that get pronghorn's fast paths, declared by what differs between them.

A family is data, not code: one generic decoder path (``patching.py``) reads these fields.
Adding a family means adding a spec here and a tiny test model; no forward is copied.
Values that vary per checkpoint (eps, softcap values, sliding window size, rope scaling) are
read from the model's config at run time; the spec only says where to find them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    norm_offset: float = 0.0  # Gemma scales by (1 + w)
    norm_cast: str = "llama"  # "llama": cast before * w ; "gemma": multiply in fp32, then cast
    activation: str = "swiglu"  # "swiglu" | "geglu_tanh" | "geglu_exact"
    qk_norm: bool = False  # RMSNorm on per-head q and k before RoPE (Qwen3, Gemma 3)
    fused_qkv: bool = False  # one qkv_proj instead of q/k/v_proj (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj (Phi-3)
    embedding_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma); handled by HF's model body
    final_softcap_attr: str | None = None  # config attribute holding the LM-head logit soft-cap
    attn_softcap_attr: str | None = None  # config attribute holding the attention logit soft-cap
    sliding_window: bool = False  # some or all layers use a sliding window (passed to attention)
    partial_rotary: bool = False  # only part of the head dim is rotated (Phi-3 partial_rotary_factor)
    # The MLP output goes straight into the residual add (no post-MLP norm, unlike Gemma 2/3), so a
    # backward recompute may skip computing it (see pronghorn.memory.recompute).
    mlp_output_to_residual: bool = True
    # Likewise the attention output (no post-attention norm before the add, unlike Gemma 2/3): the recompute may
    # skip o_proj and take the sum, the input of this norm, from pronghorn.memory.stash.
    attn_output_to_residual: bool = True
    residual_norm: str = "post_attention_layernorm"

    @property
    def gated_activation(self) -> str:
        return self.activation


LLAMA = FamilySpec("llama", ("llama",))
MISTRAL = FamilySpec("mistral", ("mistral",), sliding_window=True)
QWEN2 = FamilySpec("qwen2", ("qwen2",), sliding_window=True)
QWEN3 = FamilySpec("qwen3", ("qwen3",), qk_norm=True, sliding_window=True)
GEMMA = FamilySpec("gemma", ("gemma",), norm_offset=1.0, norm_cast="gemma", activation="geglu_tanh",
                   embedding_scale=True)
GEMMA2 = FamilySpec("gemma2", ("gemma2",), norm_offset=1.0, norm_cast="gemma", activation="geglu_tanh",
                    embedding_scale=True, final_softcap_attr="final_logit_softcapping",
                    attn_softcap_attr="attn_logit_softcapping", sliding_window=True, mlp_output_to_residual=False,
                    attn_output_to_residual=False)
GEMMA3 = FamilySpec("gemma3", ("gemma3_text",), norm_offset=1.0, norm_cast="gemma", activation="geglu_tanh",
                    qk_norm=True, embedding_scale=True, final_softcap_attr="final_logit_softcapping",
                    attn_softcap_attr="attn_logit_softcapping", sliding_window=True, mlp_output_to_residual=False,
                    attn_output_to_residual=False)
PHI3 = FamilySpec("phi3", ("phi3",), fused_qkv=True, fused_gate_up=True, sliding_window=True,
                  partial_rotary=True)

FAMILIES: tuple[FamilySpec, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3)
_BY_MODEL_TYPE = {mt: spec for spec in FAMILIES for mt in spec.model_types}


def spec_for(config) -> FamilySpec | None:
    """The family spec for a Hugging Face config, or None for families without fast paths."""
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)
