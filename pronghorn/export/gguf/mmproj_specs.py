"""Per-family facts for llama.cpp's vision projector files (mmproj, the "clip" GGUF architecture).

A family is declared as a :class:`ProjectorSpec`: the ``clip.projector_type`` llama.cpp dispatches on,
a table of Hugging Face weight names (relative to the VLM's ``model.``) to GGUF tensor names, how some
tensors are split or adjusted, and the hyper-parameters read from the transformers config.

Conventions llama.cpp's clip loader expects (checked against its multimodal library):

* Qwen2-VL / Qwen2.5-VL: the fused ``attn.qkv`` is stored as separate q/k/v; the Conv3d patch embedding
  (temporal size 2) is stored as two Conv2d kernels ``v.patch_embd.weight`` and ``v.patch_embd.weight.1``;
  the merger's norm is ``v.post_ln`` and its two linears ``mm.0`` / ``mm.2``. Qwen2.5-VL's window attention
  is described by ``n_wa_pattern`` (every n-th block attends globally), which needs evenly spaced
  ``fullatt_block_indexes``.
* Gemma 3: a SigLIP encoder; the projector's ``mm_soft_emb_norm`` is a (1 + w) RMSNorm, stored as
  ``w + 1``; the input projection keeps Hugging Face's (vision, text) shape; the average-pool kernel is
  ``clip.vision.projector.scale_factor`` = patches per side / tokens per side.
* A vision FFN is ``ffn_up`` (hidden -> intermediate) then ``ffn_down``; llama.cpp swaps the two when the
  "down" weight's input width equals the hidden size (a legacy layout), so intermediate == hidden cannot be
  exported faithfully and is refused.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import gguf
import torch


@dataclasses.dataclass(frozen=True)
class Split:
    """A tensor transform producing one or more GGUF tensors: ``apply(t)[i]`` has shape ``shape(t.shape)``."""

    apply: Callable[[torch.Tensor], list[torch.Tensor]]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda shape: shape


def _split_qkv(t: torch.Tensor) -> list[torch.Tensor]:
    if t.shape[0] % 3:
        raise ValueError(f"fused qkv has {t.shape[0]} rows, not a multiple of 3")
    return list(torch.chunk(t, 3, dim=0))


def _split_temporal(t: torch.Tensor) -> list[torch.Tensor]:
    if t.dim() != 5 or t.shape[2] != 2:
        raise NotImplementedError(f"patch embedding of shape {tuple(t.shape)}: llama.cpp reads a Conv3d with "
                                  "temporal_patch_size=2 only")
    return [t[:, :, 0].contiguous(), t[:, :, 1].contiguous()]


SPLIT_QKV = Split(_split_qkv, lambda shape: (shape[0] // 3, *shape[1:]))
SPLIT_TEMPORAL = Split(_split_temporal, lambda shape: (shape[0], shape[1], *shape[3:]))
PLUS_ONE = Split(lambda t: [t.float() + 1.0])   # (1 + w) RMSNorm weight -> the w llama.cpp multiplies by


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """HF name regex -> GGUF name template(s) (``{0}``, ``{1}`` are the regex groups), optionally split."""

    pattern: str
    targets: tuple[str, ...]
    split: Split | None = None

    def match(self, name: str) -> list[str] | None:
        m = re.fullmatch(self.pattern, name)
        return None if m is None else [t.format(*m.groups()) for t in self.targets]


def _rule(pattern: str, *targets: str, split: Split | None = None) -> TensorRule:
    return TensorRule(pattern, targets, split)


_BLOCK = r"visual\.blocks\.(\d+)\."
_WB = r"(weight|bias)"
QWEN_VL_RULES = (
    _rule(r"visual\.patch_embed\.proj\.weight", "v.patch_embd.weight", "v.patch_embd.weight.1",
          split=SPLIT_TEMPORAL),
    _rule(_BLOCK + r"norm1\." + _WB, "v.blk.{0}.ln1.{1}"),
    _rule(_BLOCK + r"norm2\." + _WB, "v.blk.{0}.ln2.{1}"),
    _rule(_BLOCK + r"attn\.qkv\." + _WB, "v.blk.{0}.attn_q.{1}", "v.blk.{0}.attn_k.{1}", "v.blk.{0}.attn_v.{1}",
          split=SPLIT_QKV),
    _rule(_BLOCK + r"attn\.proj\." + _WB, "v.blk.{0}.attn_out.{1}"),
    _rule(_BLOCK + r"mlp\.fc1\." + _WB, "v.blk.{0}.ffn_up.{1}"),
    _rule(_BLOCK + r"mlp\.fc2\." + _WB, "v.blk.{0}.ffn_down.{1}"),
    _rule(_BLOCK + r"mlp\.gate_proj\." + _WB, "v.blk.{0}.ffn_gate.{1}"),
    _rule(_BLOCK + r"mlp\.up_proj\." + _WB, "v.blk.{0}.ffn_up.{1}"),
    _rule(_BLOCK + r"mlp\.down_proj\." + _WB, "v.blk.{0}.ffn_down.{1}"),
    _rule(r"visual\.merger\.ln_q\." + _WB, "v.post_ln.{0}"),
    _rule(r"visual\.merger\.mlp\.0\." + _WB, "mm.0.{0}"),
    _rule(r"visual\.merger\.mlp\.2\." + _WB, "mm.2.{0}"),
)

_LAYER = r"vision_tower\.encoder\.layers\.(\d+)\."
GEMMA3_RULES = (
    _rule(r"vision_tower\.embeddings\.patch_embedding\." + _WB, "v.patch_embd.{0}"),
    _rule(r"vision_tower\.embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    _rule(_LAYER + r"layer_norm1\." + _WB, "v.blk.{0}.ln1.{1}"),
    _rule(_LAYER + r"layer_norm2\." + _WB, "v.blk.{0}.ln2.{1}"),
    _rule(_LAYER + r"self_attn\.q_proj\." + _WB, "v.blk.{0}.attn_q.{1}"),
    _rule(_LAYER + r"self_attn\.k_proj\." + _WB, "v.blk.{0}.attn_k.{1}"),
    _rule(_LAYER + r"self_attn\.v_proj\." + _WB, "v.blk.{0}.attn_v.{1}"),
    _rule(_LAYER + r"self_attn\.out_proj\." + _WB, "v.blk.{0}.attn_out.{1}"),
    _rule(_LAYER + r"mlp\.fc1\." + _WB, "v.blk.{0}.ffn_up.{1}"),
    _rule(_LAYER + r"mlp\.fc2\." + _WB, "v.blk.{0}.ffn_down.{1}"),
    _rule(r"vision_tower\.post_layernorm\." + _WB, "v.post_ln.{0}"),
    _rule(r"multi_modal_projector\.mm_input_projection_weight", "mm.input_projection.weight"),
    _rule(r"multi_modal_projector\.mm_soft_emb_norm\.weight", "mm.soft_emb_norm.weight", split=PLUS_ONE),
)


@dataclasses.dataclass(frozen=True)
class VisionHParams:
    """The ``clip.vision.*`` numbers of one model."""

    embedding_length: int
    feed_forward_length: int
    block_count: int
    head_count: int
    projection_dim: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    activation: str                       # "gelu" | "silu" | "gelu_quick" (llama.cpp's three FFN flags)
    extra: dict = dataclasses.field(default_factory=dict)   # family keys: merge size, window pattern, ...


def _activation(act: str) -> str:
    table = {"quick_gelu": "gelu_quick", "gelu_pytorch_tanh": "gelu", "gelu": "gelu", "silu": "silu"}
    if act not in table:
        raise NotImplementedError(f"vision activation {act!r} has no llama.cpp clip equivalent; supported: "
                                  f"{sorted(table)}")
    return table[act]


def _qwen2_vl_hparams(config) -> VisionHParams:
    vc = config.vision_config
    return VisionHParams(
        embedding_length=vc.embed_dim, feed_forward_length=int(vc.embed_dim * vc.mlp_ratio), block_count=vc.depth,
        head_count=vc.num_heads, projection_dim=config.text_config.hidden_size,
        image_size=int(getattr(vc, "image_size", 560) or 560), patch_size=vc.patch_size, layer_norm_eps=1e-6,
        activation=_activation(vc.hidden_act),
        extra={"spatial_merge_size": vc.spatial_merge_size, "temporal_patch_size": vc.temporal_patch_size})


def window_attention_pattern(fullatt_block_indexes: list[int]) -> int:
    """llama.cpp's ``n_wa_pattern``: blocks n-1, 2n-1, ... attend globally; others attend within windows."""
    indexes = list(fullatt_block_indexes)
    if not indexes:
        raise ValueError("fullatt_block_indexes is empty; llama.cpp needs at least one full-attention block")
    n = indexes[0] + 1
    if indexes != list(range(n - 1, n - 1 + n * len(indexes), n)):
        raise NotImplementedError(f"fullatt_block_indexes {indexes} are not evenly spaced (every n-th block); "
                                  "llama.cpp's Qwen2.5-VL encoder cannot express this pattern")
    return n


def _qwen2_5_vl_hparams(config) -> VisionHParams:
    vc = config.vision_config
    return VisionHParams(
        embedding_length=vc.hidden_size, feed_forward_length=vc.intermediate_size, block_count=vc.depth,
        head_count=vc.num_heads, projection_dim=vc.out_hidden_size, image_size=int(getattr(vc, "image_size", 560)
                                                                                   or 560),
        patch_size=vc.patch_size, layer_norm_eps=1e-6, activation=_activation(vc.hidden_act),
        extra={"spatial_merge_size": vc.spatial_merge_size, "temporal_patch_size": vc.temporal_patch_size,
               "n_wa_pattern": window_attention_pattern(vc.fullatt_block_indexes), "window_size": vc.window_size})


def _gemma3_hparams(config) -> VisionHParams:
    vc = config.vision_config
    per_side = vc.image_size // vc.patch_size
    tokens_per_side = math.isqrt(int(config.mm_tokens_per_image))
    if tokens_per_side ** 2 != config.mm_tokens_per_image or per_side % tokens_per_side:
        raise NotImplementedError(f"mm_tokens_per_image={config.mm_tokens_per_image} with {per_side} patches per "
                                  "side is not a square average-pool llama.cpp can run")
    return VisionHParams(
        embedding_length=vc.hidden_size, feed_forward_length=vc.intermediate_size, block_count=vc.num_hidden_layers,
        head_count=vc.num_attention_heads, projection_dim=config.text_config.hidden_size, image_size=vc.image_size,
        patch_size=vc.patch_size, layer_norm_eps=float(vc.layer_norm_eps), activation=_activation(vc.hidden_act),
        extra={"projector_scale_factor": per_side // tokens_per_side})


@dataclasses.dataclass(frozen=True)
class ProjectorSpec:
    """How one VLM family becomes a llama.cpp mmproj file."""

    projector_type: str
    rules: tuple[TensorRule, ...]
    hparams: Callable[[object], VisionHParams]
    skip: tuple[str, ...] = ()              # HF name prefixes llama.cpp does not use
    f16_tensors: tuple[str, ...] = ()       # GGUF names kept in f16 under quantized methods (see below)


# Keyed by the VLM's model_type. Patch embeddings are convolutions (ggml runs them in f16/f32 only);
# Gemma 3's input projection is multiplied transposed, which llama.cpp cannot do on quantized blocks.
PROJECTORS: dict[str, ProjectorSpec] = {
    "qwen2_vl": ProjectorSpec(gguf.VisionProjectorType.QWEN2VL, QWEN_VL_RULES, _qwen2_vl_hparams),
    "qwen2_5_vl": ProjectorSpec(gguf.VisionProjectorType.QWEN25VL, QWEN_VL_RULES, _qwen2_5_vl_hparams),
    "gemma3": ProjectorSpec(gguf.VisionProjectorType.GEMMA3, GEMMA3_RULES, _gemma3_hparams,
                            skip=("vision_tower.head.",), f16_tensors=("mm.input_projection.weight",)),
}


def projector_for(config) -> ProjectorSpec:
    """The :class:`ProjectorSpec` of a VLM config, or an error naming the families that export to GGUF."""
    model_type = getattr(config, "model_type", None)
    if model_type not in PROJECTORS:
        raise NotImplementedError(
            f"GGUF export of vision-language model_type {model_type!r} is not supported; supported: "
            f"{sorted(PROJECTORS)} (Qwen2-VL, Qwen2.5-VL, Gemma 3). Save it with save_pretrained_merged and "
            "convert with llama.cpp's own converter (convert_hf_to_gguf.py --mmproj) instead")
    return PROJECTORS[model_type]
