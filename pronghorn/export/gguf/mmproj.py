"""Write a VLM's vision encoder and projector as llama.cpp's mmproj GGUF (architecture "clip").

llama.cpp's multimodal library (libmtmd) loads this file next to the text GGUF. Like the text writer,
every tensor descriptor is planned first and each merged weight is produced, converted, written and
freed in turn. Tensor types: 1-D tensors and learned position embeddings stay f32; convolution kernels
(patch embeddings) stay f16 (f32 under ``"f32"``) because ggml runs convolutions in those types only;
everything else follows the chosen method with the usual block-size fallback.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import gguf
import torch

from pronghorn.export.gguf.mmproj_specs import ProjectorSpec, VisionHParams
from pronghorn.export.gguf.quantize import DIRECT_TYPES, tensor_type, type_nbytes
from pronghorn.export.gguf.writer import write_tensors
from pronghorn.export.merge import TensorSource

Q = gguf.GGMLQuantizationType
MMPROJ_METHODS = ("f32", "f16", "bf16", "q8_0")


@dataclasses.dataclass
class PlannedVisionTensor:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]


def _vision_type(gguf_name: str, shape: tuple[int, ...], method: str, spec: ProjectorSpec):
    if len(shape) < 2 or "position_embd" in gguf_name:
        return Q.F32
    if "patch_embd" in gguf_name:
        return Q.F32 if method == "f32" else Q.F16
    if gguf_name in spec.f16_tensors and method not in ("f32", "f16"):
        return Q.F16
    return tensor_type(gguf_name, shape, method)


def plan_mmproj_tensors(sources: list[TensorSource], spec: ProjectorSpec, method: str) -> list[PlannedVisionTensor]:
    """Every tensor of the mmproj file with its llama.cpp name and type; unknown weights are an error."""
    out: list[PlannedVisionTensor] = []
    for src in sources:
        if src.name.startswith(spec.skip):
            continue
        for rule in spec.rules:
            names = rule.match(src.name)
            if names is None:
                continue
            shape = rule.split.shape(src.shape) if rule.split is not None else src.shape
            for i, name in enumerate(names):
                def produce(src=src, rule=rule, i=i) -> torch.Tensor:
                    t = src.load()
                    return rule.split.apply(t)[i] if rule.split is not None else t
                out.append(PlannedVisionTensor(name, shape, _vision_type(name, shape, method, spec), produce))
            break
        else:
            raise NotImplementedError(f"no llama.cpp mmproj tensor name for {src.name!r} "
                                      f"({spec.projector_type}); this vision tower has weights llama.cpp's "
                                      "clip loader does not expect")
    return out


def _image_stats(image_processor) -> tuple[list[float], list[float]]:
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError(f"{type(image_processor).__name__} has no image_mean/image_std; the mmproj file needs the "
                         "normalisation the model was trained with. Pass the model's processor")
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(x) for x in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(x) for x in std]
    return mean, std


def write_vision_metadata(writer: gguf.GGUFWriter, spec: ProjectorSpec, hp: VisionHParams, image_processor) -> None:
    """The ``clip.*`` keys libmtmd reads to rebuild the vision encoder."""
    if hp.feed_forward_length == hp.embedding_length:
        raise NotImplementedError(f"vision intermediate_size == hidden_size ({hp.embedding_length}): llama.cpp's "
                                  "clip loader would take the FFN for its legacy swapped layout")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(spec.projector_type)
    writer.add_vision_projection_dim(hp.projection_dim)
    writer.add_vision_image_size(hp.image_size)
    writer.add_vision_patch_size(hp.patch_size)
    writer.add_vision_embedding_length(hp.embedding_length)
    writer.add_vision_feed_forward_length(hp.feed_forward_length)
    writer.add_vision_block_count(hp.block_count)
    writer.add_vision_head_count(hp.head_count)
    writer.add_vision_attention_layernorm_eps(hp.layer_norm_eps)
    mean, std = _image_stats(image_processor)
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
    if hp.activation == "gelu":
        writer.add_vision_use_gelu(True)
    elif hp.activation == "silu":
        writer.add_vision_use_silu(True)
    extra = hp.extra
    if "temporal_patch_size" in extra and extra["temporal_patch_size"] != 2:
        raise NotImplementedError(f"temporal_patch_size={extra['temporal_patch_size']}; llama.cpp reads 2 only")
    if "spatial_merge_size" in extra:
        writer.add_vision_spatial_merge_size(int(extra["spatial_merge_size"]))
    if "n_wa_pattern" in extra:
        writer.add_vision_n_wa_pattern(int(extra["n_wa_pattern"]))
        writer.add_vision_window_size(int(extra["window_size"]))
    if "projector_scale_factor" in extra:
        writer.add_vision_projector_scale_factor(int(extra["projector_scale_factor"]))


def mmproj_nbytes(tensors: list[PlannedVisionTensor]) -> int:
    """Bytes of tensor data in the mmproj file."""
    return sum(type_nbytes(t.shape, t.qtype) for t in tensors)


def check_mmproj_method(method: str) -> str:
    """``method`` if the projector file can be written in it, else an error listing the choices."""
    if method not in MMPROJ_METHODS:
        raise ValueError(f"mmproj_quantization={method!r}; choose one of {MMPROJ_METHODS} (llama.cpp recommends "
                         "f16 for the projector)")
    return method


def write_mmproj(path: str | os.PathLike, sources: list[TensorSource], spec: ProjectorSpec, config,
                 image_processor, method: str = "f16", model_name: str = "model") -> None:
    """Write the vision tensors ``sources`` (names relative to the VLM's ``model.``) as an mmproj GGUF."""
    check_mmproj_method(method)
    hp = spec.hparams(config)
    tensors = plan_mmproj_tensors(sources, spec, method)
    writer = gguf.GGUFWriter(os.fspath(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    try:
        writer.add_name(f"{model_name} vision projector")
        writer.add_file_type(int(DIRECT_TYPES[method][1]))
        write_vision_metadata(writer, spec, hp, image_processor)
        write_tensors(writer, tensors, prepare=lambda x: x.float().contiguous())
    finally:
        writer.close()
