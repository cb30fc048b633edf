"""FastVisionModel: Unsloth's vision API names and arguments, backed by transformers + PEFT + our fast paths."""
from __future__ import annotations

import logging

import torch

from pronghorn.config.validation import ConfigError, validate_load
from pronghorn.models.dtypes import resolve_dtype
from pronghorn.models.fast_language_model import (
    _attach_exports,
    _enable_checkpointing,
    _finish_loading,
    _remember,
)
from pronghorn.models.modes import for_inference, for_training
from pronghorn.models.sources import resolve_source

logger = logging.getLogger(__name__)


class FastVisionModel:
    """Load, adapt and switch vision-language models (``AutoModelForImageTextToText``). Static methods, as in
    Unsloth."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int | None = None,
        dtype=None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        device_map="auto",
        trust_remote_code: bool = False,
        token: str | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
        use_gradient_checkpointing="unsloth",
        fast_paths: bool = True,
        quantize_vision_projector: bool = False,
        **kwargs,
    ):
        """Load a vision-language model and its processor; returns ``(model, processor)``.

        Args:
            model_name: a Hub name ("Qwen/Qwen2.5-VL-7B-Instruct"), a local checkpoint directory, or a saved LoRA
                adapter directory (its base is loaded and the adapter attached, trainable).
            max_seq_length: longest sequence (text plus image tokens) you will train on; None keeps the
                model's own limit. Recorded on the model; the collator enforces it.
            dtype: None picks bf16 where the GPU supports it, else fp16, and fp32 on CPU.
            load_in_4bit / load_in_8bit: bitsandbytes NF4 (double quantized) or int8 for the linear layers;
                the projector, patch embedding and output layer stay in ``dtype`` unless
                ``quantize_vision_projector=True``.
            full_finetuning: train every weight (no LoRA); needs 16/32-bit weights.
            attn_implementation: force "sdpa" / "eager" / "flash_attention_2".
            use_gradient_checkpointing: used when ``full_finetuning`` or an adapter is loaded; else set it
                in ``get_peft_model``.
            fast_paths: pronghorn's kernels on the language model where the math is exact (reversible with
                ``pronghorn.unpatch_model``).
        """
        from transformers import AutoConfig, AutoModelForImageTextToText

        from pronghorn.models.vision.families import quant_skip_modules
        from pronghorn.models.vision.processors import load_processor
        from pronghorn.quant.bnb import quantization_config
        from pronghorn.versions import check_versions

        if max_seq_length is not None:
            validate_load(max_seq_length, load_in_4bit, load_in_8bit, full_finetuning)
        else:
            validate_load(1, load_in_4bit, load_in_8bit, full_finetuning)
        check_versions(strict=False)
        dtype = resolve_dtype(dtype)
        if model_name is None:
            raise ConfigError("FastVisionModel.from_pretrained needs model_name: a Hub name such as "
                              "'Qwen/Qwen2.5-VL-7B-Instruct' or a local checkpoint directory")
        source = resolve_source(model_name, token=token, revision=revision, trust_remote_code=trust_remote_code)
        hub_kwargs = {"token": token, "revision": revision, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(source.base, **hub_kwargs)
        _check_is_vision_config(config, model_name)
        skip = None if quantize_vision_projector else quant_skip_modules(config)
        quant = quantization_config(load_in_4bit, load_in_8bit, dtype, skip_modules=skip)
        if not torch.cuda.is_available():
            device_map = None
        attn_implementation = _vision_attention(attn_implementation)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(
            source.base, config=config, dtype=dtype, quantization_config=quant, device_map=device_map,
            **hub_kwargs, **kwargs,
        )
        processor = load_processor(source.adapter or source.base, **hub_kwargs)
        _fix_processor_padding(processor, model)
        limit = max_seq_length or getattr(model.config.get_text_config(), "max_position_embeddings", None)
        model.max_seq_length = limit
        _remember(model, max_seq_length=limit, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                  full_finetuning=full_finetuning, base_model=source.base, vision=True,
                  quant_skip_modules=skip)
        if fast_paths:
            from pronghorn.models.vision.patching import patch_vision_model

            patch_vision_model(model)
        model = _finish_loading(model, full_finetuning, use_gradient_checkpointing, source.adapter)
        return model, processor

    @staticmethod
    def get_peft_model(
        model,
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        target_modules="all-linear",
        modules_to_save=None,
        use_rslora: bool = False,
        random_state: int = 3407,
        use_gradient_checkpointing="unsloth",
        layers_to_transform=None,
        init_lora_weights=True,
        loftq_config=None,
        **kwargs,
    ):
        """Wrap ``model`` with LoRA adapters on the chosen parts; returns the PEFT model, in training mode.

        Args:
            finetune_vision_layers / finetune_language_layers: adapt the vision tower (with its projector)
                and/or the language model.
            finetune_attention_modules / finetune_mlp_modules: adapt attention and/or MLP projections.
            target_modules: "all-linear" (default) applies the four switches above; a list of module names or
                a regex is used as given and the switches are ignored.
            r, lora_alpha, lora_dropout, bias, use_rslora, init_lora_weights, loftq_config: as in PEFT's LoraConfig.
            modules_to_save: fully trained extra modules, e.g. ["lm_head"].
            random_state: seed for the adapter initialisation.
            use_gradient_checkpointing: "unsloth" (layer inputs parked in CPU memory), True (recompute on the
                GPU) or False; applies to vision and language layers alike.
        """
        from pronghorn.models.lora_setup import add_lora
        from pronghorn.models.vision.families import vision_spec_for_model
        from pronghorn.models.vision.targets import select_lora_targets

        switches = {"finetune_vision_layers": finetune_vision_layers,
                    "finetune_language_layers": finetune_language_layers,
                    "finetune_attention_modules": finetune_attention_modules,
                    "finetune_mlp_modules": finetune_mlp_modules}
        if target_modules == "all-linear":
            spec = getattr(model, "_pronghorn_vision_spec", None) or vision_spec_for_model(model)
            target_modules, _ = select_lora_targets(model, spec, **switches)
        elif not all(switches.values()):
            logger.warning("target_modules was given explicitly, so the finetune_* switches %s are ignored",
                           {k: v for k, v in switches.items() if not v})
        model = add_lora(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias=bias, layers_to_transform=layers_to_transform, layers_pattern=None, random_state=random_state,
            use_rslora=use_rslora, modules_to_save=modules_to_save, init_lora_weights=init_lora_weights,
            loftq_config=loftq_config, use_gradient_checkpointing=use_gradient_checkpointing, **kwargs,
        )
        _enable_checkpointing(model, use_gradient_checkpointing)
        _attach_exports(model)
        return for_training(model)

    for_training = staticmethod(for_training)
    for_inference = staticmethod(for_inference)


def _check_is_vision_config(config, model_name) -> None:
    if getattr(config, "vision_config", None) is None and not hasattr(config, "vision_tower"):
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise ConfigError(
                f"{model_name!r} is a {config.model_type!r} model without a vision tower; load text-only models "
                "with FastLanguageModel.from_pretrained"
            )


def _fix_processor_padding(processor, model) -> None:
    """Right padding and a pad token on the processor's tokenizer (training pads on the right)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return
    from pronghorn.models.tokenizer_setup import fix_tokenizer, sync_pad_token

    fix_tokenizer(tokenizer, getattr(tokenizer, "model_max_length", None) or 10**9)
    sync_pad_token(model, tokenizer)


def _vision_attention(requested: str | None) -> str | None:
    """On CUDA, sdpa under pronghorn's backend policy unless the user chose: a VLM batch's image sizes and
    text lengths change every step, and torch's default (cuDNN on Hopper) builds a new plan for each shape."""
    from pronghorn.nn.attention import POLICY_SDPA, register_policy_sdpa

    if requested == POLICY_SDPA or (requested is None and torch.cuda.is_available()):
        register_policy_sdpa()
        return POLICY_SDPA
    return requested
