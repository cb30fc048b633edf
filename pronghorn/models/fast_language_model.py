"""FastLanguageModel: Unsloth's API names and arguments, backed by transformers + PEFT + our fast paths."""
from __future__ import annotations

import logging

import torch

from pronghorn.config.validation import validate_load
from pronghorn.models.dtypes import resolve_dtype
from pronghorn.models.gc_freeze import freeze_long_lived_objects
from pronghorn.models.modes import for_inference, for_training
from pronghorn.models.sources import resolve_source
from pronghorn.models.tokenizer_setup import sync_pad_token

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FastLanguageModel:
    """Load, adapt and switch causal language models. All methods are static, as in Unsloth."""

    @staticmethod
    def from_pretrained(
        model_name: str | None = None,
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        load_in_16bit: bool | None = None,
        full_finetuning: bool = False,
        device_map="auto",
        rope_scaling: dict | None = None,
        trust_remote_code: bool = False,
        token: str | None = None,
        revision: str | None = None,
        fix_tokenizer: bool = True,
        attn_implementation: str | None = None,
        use_gradient_checkpointing="unsloth",
        fast_paths: bool = True,
        **kwargs,
    ):
        """Load a causal LM and its tokenizer; returns ``(model, tokenizer)``.

        Args:
            model_name: a Hub name ("meta-llama/Llama-3.1-8B"), a local checkpoint directory, a saved LoRA
                adapter directory (its base is loaded and the adapter attached, trainable), or None for
                the small model embedded in pronghorn.
            max_seq_length: longest sequence you will train on; beyond the model's trained context,
                RoPE scaling is applied.
            dtype: None picks bf16 where the GPU supports it, else fp16, and fp32 on CPU.
            load_in_4bit / load_in_8bit: bitsandbytes NF4 (double quantized, computing in ``dtype``) or int8.
            full_finetuning: train every weight (no LoRA); needs 16/32-bit weights.
            device_map: passed to transformers ("auto" places the model on the GPU when there is one).
            rope_scaling: explicit RoPE scaling parameters, e.g. {"rope_type": "linear", "factor": 2.0}.
            fix_tokenizer: give the tokenizer a pad token and right padding when it lacks them.
            attn_implementation: force "sdpa" / "eager" / "flash_attention_2" / "flex_attention".
            fast_paths: apply pronghorn's kernels to supported families (reversible, see patch_model).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from pronghorn.quant.bnb import quantization_config

        from pronghorn.versions import check_versions

        validate_load(max_seq_length, load_in_4bit, load_in_8bit, full_finetuning, load_in_16bit)
        check_versions(strict=False)  # outside the tested window: a warning with the pip command that fixes it
        dtype = resolve_dtype(dtype)
        source = resolve_source(model_name, token=token, revision=revision, trust_remote_code=trust_remote_code)
        hub_kwargs = dict(token=token, revision=revision, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source.base, **hub_kwargs)

        from pronghorn.models.rope_scaling import apply_rope_scaling

        apply_rope_scaling(config, max_seq_length, rope_scaling)
        quant = quantization_config(load_in_4bit, load_in_8bit, dtype)
        if not torch.cuda.is_available():
            device_map = None
        attn = _attention_for(config, attn_implementation)
        model = AutoModelForCausalLM.from_pretrained(
            source.base, config=config, dtype=dtype, quantization_config=quant, device_map=device_map,
            attn_implementation=attn, **hub_kwargs, **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(source.adapter or source.base, **hub_kwargs)
        if fix_tokenizer:
            from pronghorn.models.tokenizer_setup import fix_tokenizer as _fix

            _fix(tokenizer, max_seq_length)
        sync_pad_token(model, tokenizer)
        model.max_seq_length = max_seq_length
        _remember(model, max_seq_length=max_seq_length, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                  full_finetuning=full_finetuning, base_model=source.base)
        if fast_paths:
            from pronghorn.models.patching import patch_model

            patch_model(model)
        model = _finish_loading(model, full_finetuning, use_gradient_checkpointing, source.adapter)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules=DEFAULT_TARGET_MODULES,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform=None,
        layers_pattern=None,
        use_gradient_checkpointing="unsloth",
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        modules_to_save=None,
        init_lora_weights=True,
        loftq_config=None,
        offload_embedding: bool | None = None,
        **kwargs,
    ):
        """Wrap ``model`` with LoRA adapters (PEFT) and set up checkpointing; returns the PEFT model.

        Args:
            r, lora_alpha, lora_dropout, bias, use_rslora, init_lora_weights, loftq_config: as in PEFT's
                LoraConfig (dropout 0 and bias "none" take the fused fast path).
            target_modules: module names (e.g. ["q_proj", ..., "down_proj"]) or "all-linear".
            modules_to_save: fully trained extra modules, e.g. ["lm_head", "embed_tokens"].
            use_gradient_checkpointing: "unsloth" (alias of "offload": layer inputs kept in CPU memory),
                True (recompute on the GPU), or False.
            random_state: seed for the adapter initialisation.
            offload_embedding: keep a frozen, untied input embedding table in pinned host memory, looked up
                from the GPU (:mod:`pronghorn.memory.host_embedding`); default on, or
                ``PRONGHORN_OFFLOAD_EMBEDDING``.
        """
        from pronghorn.models.lora_setup import add_lora

        model = add_lora(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias=bias, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
            random_state=random_state, use_rslora=use_rslora, modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights, loftq_config=loftq_config,
            use_gradient_checkpointing=use_gradient_checkpointing, **kwargs,
        )
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        _enable_checkpointing(model, use_gradient_checkpointing)
        _offload_embedding(model, offload_embedding)
        _attach_exports(model)
        model = for_training(model)
        freeze_long_lived_objects()
        return model

    for_training = staticmethod(for_training)
    for_inference = staticmethod(for_inference)


FastModel = FastLanguageModel


def _remember(model, **facts) -> None:
    """Keep what we loaded with on the model; exports and model cards read it."""
    record = dict(getattr(model, "_pronghorn_load", {}) or {})
    record.update(facts)
    model._pronghorn_load = record


def _attention_for(config, requested: str | None) -> str:
    from pronghorn.nn.attention import VARLEN_SDPA, choose_attention_implementation, register_varlen_sdpa

    choice = choose_attention_implementation(config, requested=requested)
    if choice.implementation == VARLEN_SDPA:
        register_varlen_sdpa()
    logger.info("Attention: %s (%s)", choice.implementation, choice.reason)
    return choice.implementation


def _finish_loading(model, full_finetuning: bool, use_gradient_checkpointing, adapter_dir):
    """What every loader ends with: all weights trainable for full fine-tuning, a saved adapter attached
    when the source was an adapter directory, and the export methods bound on the instance."""
    if full_finetuning:
        for param in model.parameters():
            param.requires_grad_(True)
        _enable_checkpointing(model, use_gradient_checkpointing)
    if adapter_dir:
        model = _load_adapter(model, adapter_dir, use_gradient_checkpointing)
    _attach_exports(model)
    if full_finetuning or adapter_dir:  # ready to train as loaded (LoRA models freeze after get_peft_model)
        freeze_long_lived_objects()
    return model


def _load_adapter(model, adapter_dir: str, use_gradient_checkpointing):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    logger.info("Loaded LoRA adapter from %s on top of its base model; it is trainable.", adapter_dir)
    _enable_checkpointing(model, use_gradient_checkpointing)
    _offload_embedding(model, None)
    return for_training(model)


def _offload_embedding(model, requested: bool | None) -> None:
    from pronghorn.memory.host_embedding import offload_enabled, offload_input_embeddings

    if offload_enabled(requested):
        offload_input_embeddings(model)


def _enable_checkpointing(model, mode) -> None:
    from pronghorn.memory.checkpointing import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, mode)


def _attach_exports(model) -> None:
    from pronghorn.export.methods import attach_export_methods

    attach_export_methods(model)
