"""Per-family facts llama.cpp needs: architecture name, hyper-parameter keys, tensor transforms.

A family is a small declarative spec; :func:`write_arch_metadata` reads it and the transformers
config. Two weight conventions differ between Hugging Face and llama.cpp:

* Llama-style models (``llama`` arch) use "normal" rotary embeddings in llama.cpp, which rotate
  adjacent pairs (2i, 2i+1), while Hugging Face rotates halves (i, i + d/2). Q and K rows are
  therefore reordered inside each head so that row 2i+j of a head is HF row j*d/2 + i.
  Families that llama.cpp runs with "neox" rotary (Qwen, Gemma, Phi-3) keep HF's order.
* Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp multiplies by the stored weight, so the
  GGUF stores ``weight + 1`` for every Gemma norm.
"""
from __future__ import annotations

import dataclasses
import math

import gguf
import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
    """How one transformers ``model_type`` maps onto a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False          # llama.cpp "normal" rope: reorder Q/K rows per head
    norm_plus_one: bool = False       # Gemma-style (1 + w) RMSNorm
    tied_output_fallback: bool = True  # llama.cpp reuses token_embd when output.weight is absent
    softcapping: bool = False
    sliding_window: bool = False
    swa_rope_base: bool = False       # separate rope base for sliding-window layers (Gemma 3)
    mrope: bool = False               # multimodal rope sections (Qwen2-VL / Qwen2.5-VL language models)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GGUFFamily(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": GGUFFamily(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GGUFFamily(gguf.MODEL_ARCH.QWEN3),
    "gemma": GGUFFamily(gguf.MODEL_ARCH.GEMMA, norm_plus_one=True),
    "gemma2": GGUFFamily(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True, softcapping=True, sliding_window=True),
    "gemma3_text": GGUFFamily(gguf.MODEL_ARCH.GEMMA3, norm_plus_one=True, sliding_window=True, swa_rope_base=True),
    "phi3": GGUFFamily(gguf.MODEL_ARCH.PHI3, tied_output_fallback=False, sliding_window=True),
}
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]
# Language models of vision-language models (their text_config's model_type); llama.cpp runs both Qwen-VL
# generations as "qwen2vl", a Qwen2 decoder with multimodal rope.
FAMILIES["qwen2_vl_text"] = GGUFFamily(gguf.MODEL_ARCH.QWEN2VL, mrope=True)
FAMILIES["qwen2_5_vl_text"] = FAMILIES["qwen2_vl_text"]


def family_for(config) -> GGUFFamily:
    """The :class:`GGUFFamily` of a transformers config, or a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "vision_config", None) is not None and hasattr(config, "text_config"):
        raise ValueError(f"{model_type!r} is a vision-language config; look up the family of its text_config "
                         "(save_pretrained_gguf does this and writes the vision part as an mmproj file)")
    if model_type not in FAMILIES:
        raise NotImplementedError(f"GGUF export does not support model_type {model_type!r}; supported: "
                                  f"{sorted(FAMILIES)}. Save with save_pretrained_merged and convert with "
                                  "llama.cpp's own converter instead")
    return FAMILIES[model_type]


def head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """Rope settings as a dict across transformers 4 (rope_theta/rope_scaling) and 5 (rope_parameters)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    out = dict(params or {})
    if "rope_theta" not in out and getattr(config, "rope_theta", None) is not None:
        out["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and "rope_type" not in out:
        out.update(scaling)
    out.setdefault("rope_type", out.get("type", "default"))
    return out


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for Llama-3.1 rope scaling (its ``rope_freqs`` tensor).

    Computed as default inverse frequencies over the scaled ones, using transformers' own rope code,
    so it matches whatever the HF model does.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = head_dim(config)
    base = float(rope_parameters(config)["rope_theta"])
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default / scaled.float()).numpy().astype(np.float32)


def _write_rope(writer: gguf.GGUFWriter, config, family: GGUFFamily) -> dict[str, np.ndarray]:
    extra: dict[str, np.ndarray] = {}
    full = rope_parameters(config, "full_attention")
    writer.add_rope_freq_base(float(full["rope_theta"]))
    kind = full["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(full["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
    elif kind == "llama3":
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(config)
    elif kind != "default":
        raise NotImplementedError(f"rope type {kind!r} ({config.model_type}) is not supported by the GGUF "
                                  "exporter yet; supported: default, linear, yarn, llama3")
    if family.swa_rope_base:
        local = rope_parameters(config, "sliding_attention")
        base = local.get("rope_theta", getattr(config, "rope_local_base_freq", None))
        if base is not None:
            writer.add_rope_freq_base_swa(float(base))
    return extra


def write_arch_metadata(writer: gguf.GGUFWriter, config, family: GGUFFamily) -> dict[str, np.ndarray]:
    """Add the architecture's hyper-parameters; returns extra tensors the architecture needs."""
    hd = head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if hd * config.num_attention_heads != config.hidden_size or family.arch in (gguf.MODEL_ARCH.GEMMA,
                                                                                gguf.MODEL_ARCH.GEMMA2,
                                                                                gguf.MODEL_ARCH.GEMMA3):
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    partial = float(rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)
                                                or 1.0))
    writer.add_rope_dimension_count(int(hd * partial))
    extra = _write_rope(writer, config, family)
    if family.mrope:
        writer.add_rope_dimension_sections(mrope_sections(config))
    if family.softcapping:
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if family.sliding_window and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    _check_attention_scale(config, family, hd)
    return extra


def mrope_sections(config) -> list[int]:
    """The (temporal, height, width) rotary sections of a Qwen-VL language model, padded to llama.cpp's four."""
    sections = rope_parameters(config).get("mrope_section")
    if not sections:
        raise ValueError(f"{config.model_type}: rope parameters have no 'mrope_section'; llama.cpp's qwen2vl "
                         "architecture needs it")
    sections = [int(x) for x in sections]
    if len(sections) > 4 or sum(sections) * 2 != head_dim(config):
        raise ValueError(f"mrope_section {sections} must have at most 4 entries summing to head_dim/2 = "
                         f"{head_dim(config) // 2}")
    return sections + [0] * (4 - len(sections))


def _check_attention_scale(config, family: GGUFFamily, hd: int) -> None:
    # llama.cpp derives Gemma 2/3's query scale from the head size (1/sqrt(head_dim)), except for 27B
    # sizes where it uses hidden/heads; a different query_pre_attn_scalar would change the outputs.
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if family.arch not in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) or scalar is None:
        return
    if not math.isclose(float(scalar), float(hd)) and not math.isclose(
            float(scalar), config.hidden_size / config.num_attention_heads):
        raise NotImplementedError(f"query_pre_attn_scalar={scalar} differs from head_dim={hd}; llama.cpp "
                                  "would scale attention differently from transformers for this model")


def permute_for_normal_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K rows (or bias) from HF's half-split rotary layout to llama.cpp's interleaved one."""
    rows = weight.shape[0]
    hd = rows // n_heads
    return (weight.reshape(n_heads, 2, hd // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape))


def transform_tensor(hf_name: str, tensor: torch.Tensor, config, family: GGUFFamily) -> torch.Tensor:
    """Apply the llama.cpp weight conventions of ``family`` to one HF tensor.

    Reordering keeps the dtype; the Gemma ``+ 1`` is done in fp32 (a bf16 norm weight plus one would
    lose its low bits). Other tensors are returned as they are, without a copy.
    """
    if family.permute_qk:
        if ".q_proj." in hf_name:
            tensor = permute_for_normal_rope(tensor, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            tensor = permute_for_normal_rope(tensor, getattr(config, "num_key_value_heads", None)
                                             or config.num_attention_heads)
    if family.norm_plus_one and hf_name.endswith("norm.weight"):
        tensor = tensor.float() + 1.0
    return tensor
