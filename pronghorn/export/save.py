"""save_pretrained_merged: write a merged 16-bit, merged 4-bit, or adapter-only checkpoint.

Memory: the merge streams one tensor at a time into the current safetensors shard, so the extra
RAM an export needs is about ``max_shard_size`` plus the largest single layer weight (in fp32 while
it is merged) -- a 70B model merges on a machine with much less RAM than the model, as long as
the model itself is loaded (e.g. in 4-bit on a GPU) and the shards fit on disk.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from pronghorn.export.atomic import atomic_output_dir, parse_size
from pronghorn.export.merge import MergePlan, materialize, plan_merge, unwrap_base_model
from pronghorn.export.model_card import build_model_card
from pronghorn.export.shards import ShardWriter
from pronghorn.export.vlm import is_vision_language, vision_module_prefixes

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
_OVERHEAD_BYTES = 64 * 2**20   # config, tokenizer, card, and filesystem slack


def _dtype_from(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(table)}")
    return table[dtype]


def estimate_merged_bytes(plan: MergePlan, save_method: str) -> int:
    """Bytes the checkpoint will take on disk (4-bit: half a byte per linear weight plus statistics)."""
    itemsize = torch.empty((), dtype=plan.dtype).element_size()
    vision = tuple(vision_module_prefixes(plan)) if is_vision_language(plan.config) else ()
    total = 0
    for src in plan.sources:
        if (save_method == "merged_4bit" and src.is_linear_weight and src.name != "lm_head.weight"
                and not (vision and src.name.startswith(vision))):
            total += src.numel // 2 + src.numel // 64 * 2
        else:
            total += src.numel * itemsize
    return total + _OVERHEAD_BYTES


def save_side_files(directory: Path, plan: MergePlan, tokenizer, quantization_config: dict | None = None) -> None:
    """Config (dtype set, quantization removed or replaced), generation config and tokenizer."""
    config = copy.deepcopy(plan.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = plan.dtype
    if plan.untie_embeddings:
        config.tie_word_embeddings = False
        if is_vision_language(config):   # a VLM's text config carries the flag too
            config.text_config.tie_word_embeddings = False
    config.save_pretrained(directory)
    generation_config = getattr(plan.base_model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _write_16bit(directory: Path, plan: MergePlan, max_shard_bytes: int) -> None:
    writer = ShardWriter(directory, max_shard_bytes)
    for src in plan.sources:
        writer.add(src.name, materialize(src, plan.dtype))
    writer.close()


def _bnb_4bit_config(plan: MergePlan, skip: list[str]) -> dict:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=plan.dtype, llm_int8_skip_modules=skip).to_dict()


def _write_4bit(directory: Path, plan: MergePlan, max_shard_bytes: int) -> dict:
    import bitsandbytes.functional as bnbf

    writer = ShardWriter(directory, max_shard_bytes)
    # A VLM's vision encoder and projector stay in 16-bit: they are small and quantizing them costs accuracy.
    vision = vision_module_prefixes(plan) if is_vision_language(plan.config) else []
    skip = ["lm_head"] + [p.rstrip(".") for p in vision]
    for src in plan.sources:
        tensor = materialize(src, plan.dtype)
        if not src.is_linear_weight or src.name.startswith("lm_head") or src.name.startswith(tuple(vision)):
            writer.add(src.name, tensor)
            continue
        device = "cuda" if torch.cuda.is_available() else "cpu"
        packed, state = bnbf.quantize_4bit(tensor.to(device), blocksize=64, quant_type="nf4",
                                           compress_statistics=True, quant_storage=torch.uint8)
        writer.add(src.name, packed.cpu().contiguous())
        for key, value in state.as_dict(packed=True).items():
            writer.add(f"{src.name}.{key}", value.cpu().contiguous())
    writer.close()
    return _bnb_4bit_config(plan, skip)


def save_pretrained_merged(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None,
                           save_method: str = "merged_16bit", *, overwrite: bool = False,
                           max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                           training_settings: dict | None = None, **unsloth_compat) -> Path:
    """Save ``model`` (a PEFT LoRA model, or a plain model) as a standalone checkpoint.

    Args:
        model: the model after training; it is read, never modified.
        save_directory: output folder (written atomically via a temporary sibling folder).
        tokenizer: saved alongside (with its chat template) when given; for a vision-language model pass
            its processor, so the image processor, tokenizer and chat template all travel along.
        save_method: ``"merged_16bit"`` (LoRA merged in fp32, written in the model's 16-bit dtype; loads
            with plain transformers), ``"merged_4bit"`` (merged, then bitsandbytes NF4; for QLoRA-style
            inference; a VLM's vision encoder and projector stay 16-bit), or ``"lora"`` (adapter weights only).
            Vision-language models (LoRA on language and vision layers) keep transformers' own weight names,
            so ``AutoModelForImageTextToText.from_pretrained`` reads the result.
        overwrite: replace a non-empty ``save_directory``; otherwise that is an error.
        max_shard_size: largest safetensors shard, e.g. ``"5GB"``; also bounds the RAM the export uses.
        dtype: output dtype for merged methods; default: the model's embedding dtype.
        training_settings: extra entries for the model card (learning rate, dataset, ...).
        unsloth_compat: Unsloth arguments accepted for drop-in use and ignored because this exporter
            does not need them (``temporary_location``, ``maximum_memory_usage``, ``safe_serialization``).

    Returns the output directory.
    """
    allowed = {"temporary_location", "maximum_memory_usage", "safe_serialization", "is_main_process"}
    unknown = set(unsloth_compat) - allowed
    if unknown:
        raise TypeError(f"save_pretrained_merged got unexpected arguments {sorted(unknown)}")
    if not unsloth_compat.get("is_main_process", True):
        return Path(save_directory)
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r}; choose one of {SAVE_METHODS}")
    if save_method == "lora":
        return save_adapter(model, save_directory, tokenizer, overwrite=overwrite,
                            training_settings=training_settings)
    plan = plan_merge(model, _dtype_from(dtype))
    max_shard_bytes = parse_size(max_shard_size)
    with atomic_output_dir(save_directory, overwrite=overwrite, required_bytes=estimate_merged_bytes(plan, save_method),
                           what=f"the {save_method} checkpoint") as tmp:
        if save_method == "merged_16bit":
            _write_16bit(tmp, plan, max_shard_bytes)
            save_side_files(tmp, plan, tokenizer)
        else:
            quant_config = _write_4bit(tmp, plan, max_shard_bytes)
            save_side_files(tmp, plan, tokenizer, quantization_config=quant_config)
        card = build_model_card(model, save_method, dtype=str(plan.dtype).replace("torch.", ""),
                                training_settings=training_settings, files=[p.name for p in tmp.iterdir()])
        (tmp / "README.md").write_text(card)
    return Path(save_directory).expanduser().resolve()


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None, *, overwrite: bool = False,
                 training_settings: dict | None = None) -> Path:
    """Write only the LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and tokenizer."""
    if not hasattr(model, "peft_config"):
        raise ValueError("save_method='lora' needs a PEFT model (from get_peft_model); this model has no "
                         "adapter. Use save_method='merged_16bit' to save full weights")
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    with atomic_output_dir(save_directory, overwrite=overwrite, required_bytes=adapter_bytes + _OVERHEAD_BYTES,
                           what="the LoRA adapter") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        card = build_model_card(model, "lora", training_settings=training_settings,
                                files=[p.name for p in tmp.iterdir()])
        (tmp / "README.md").write_text(card)
    return Path(save_directory).expanduser().resolve()


__all__ = [
    "SAVE_METHODS",
    "estimate_merged_bytes",
    "save_adapter",
    "save_pretrained_merged",
    "unwrap_base_model",
]
