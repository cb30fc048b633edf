"""Adding LoRA adapters through PEFT's public API, with checks that name what is wrong."""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from pronghorn.config.validation import ConfigError, validate_lora

logger = logging.getLogger(__name__)


def linear_layer_names(model) -> list[str]:
    """Short names of the linear layers (incl. quantized and fused ones) that LoRA could target."""
    names = set()
    for full_name, module in model.named_modules():
        if _is_linear(module) and not full_name.endswith("lm_head"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def _is_linear(module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    cls = type(module).__name__
    return cls in ("Linear4bit", "Linear8bitLt", "Conv1D")


def check_target_modules(model, target_modules) -> None:
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
            raise ConfigError(f"target_modules regex {target_modules!r} matches no module; linear layers in this "
                              f"model: {linear_layer_names(model)}")
        return
    wanted = list(target_modules)
    present = set(linear_layer_names(model))
    all_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in wanted if t not in all_names]
    if len(missing) == len(wanted):
        raise ConfigError(f"target_modules={wanted} match no layer of this {type(model).__name__}; its linear "
                          f"layers are: {sorted(present)} (or pass target_modules='all-linear')")
    if missing:
        logger.warning("target_modules %s are not in this model and are ignored (its linear layers: %s)",
                       missing, sorted(present))


def add_lora(model, *, r, target_modules, lora_alpha, lora_dropout, bias, layers_to_transform, layers_pattern,
             random_state, use_rslora, modules_to_save, init_lora_weights, loftq_config,
             use_gradient_checkpointing, **kwargs):
    """Freeze the base model and wrap it with a fresh LoRA adapter (``peft.get_peft_model``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    validate_lora(r, lora_alpha, lora_dropout, bias, use_gradient_checkpointing)
    if isinstance(model, PeftModel):
        raise ConfigError("This model already has LoRA adapters (e.g. it was loaded from an adapter directory): "
                          "train it as it is, or load the base model to start a new adapter")
    if getattr(model, "_pronghorn_load", {}).get("full_finetuning"):
        raise ConfigError("The model was loaded with full_finetuning=True; train it directly without "
                          "get_peft_model, or reload with full_finetuning=False for LoRA")
    if isinstance(target_modules, tuple):
        target_modules = list(target_modules)
    check_target_modules(model, target_modules)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
        target_modules=target_modules, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        use_rslora=use_rslora, modules_to_save=modules_to_save,
        init_lora_weights=init_lora_weights if loftq_config is None else "loftq",
        loftq_config=loftq_config or {}, **kwargs,
    )
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        peft_model = get_peft_model(model, config)
    trainable, total = _count(peft_model)
    logger.info("LoRA r=%d alpha=%s on %s: %s of %s parameters trainable (%.2f%%)", r, lora_alpha,
                target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def _count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
