"""Every cross-field rule of pronghorn's arguments, in one place, used by the Python API and the CLI."""
from __future__ import annotations

VALID_BIAS = ("none", "all", "lora_only")
VALID_CHECKPOINTING = (True, False, "unsloth", "offload", "gpu")
VALID_SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")


class ConfigError(ValueError):
    """An argument or combination of arguments is invalid; the message says what would be right."""


def validate_load(max_seq_length, load_in_4bit: bool, load_in_8bit: bool, full_finetuning: bool = False,
                  load_in_16bit: bool | None = None) -> None:
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
        raise ConfigError(f"max_seq_length must be a positive integer number of tokens (e.g. 2048), "
                          f"got {max_seq_length!r}")
    if load_in_4bit and load_in_8bit:
        raise ConfigError("load_in_4bit=True and load_in_8bit=True were both given; choose one: 4-bit NF4 "
                          "(QLoRA, least memory) or 8-bit")
    if load_in_16bit and (load_in_4bit or load_in_8bit):
        raise ConfigError("load_in_16bit=True cannot be combined with load_in_4bit/load_in_8bit; choose one")
    if full_finetuning and (load_in_4bit or load_in_8bit):
        raise ConfigError("full_finetuning=True needs 16/32-bit weights: quantized base weights cannot be "
                          "trained directly. Set load_in_4bit=False and load_in_8bit=False, or use LoRA "
                          "(full_finetuning=False)")


def validate_lora(r, lora_alpha, lora_dropout, bias, use_gradient_checkpointing) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"r (the LoRA rank) must be a positive integer such as 8, 16, 32 or 64, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be a positive number (commonly equal to r), got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1) (0 enables the fused fast path), got {lora_dropout!r}")
    if bias not in VALID_BIAS:
        raise ConfigError(f"bias must be one of {VALID_BIAS}, got {bias!r}")
    if use_gradient_checkpointing not in VALID_CHECKPOINTING:
        raise ConfigError(f"use_gradient_checkpointing must be one of {VALID_CHECKPOINTING} ('unsloth' is an "
                          f"alias of 'offload'), got {use_gradient_checkpointing!r}")


def validate_train(config) -> None:
    """Rules across a whole TrainConfig (the CLI's and YAML's single source)."""
    validate_load(config.max_seq_length, config.load_in_4bit, config.load_in_8bit, config.full_finetuning)
    if not config.full_finetuning:
        validate_lora(config.r, config.lora_alpha, config.lora_dropout, config.bias,
                      config.use_gradient_checkpointing)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if config.max_steps is not None and config.max_steps == 0:
        raise ConfigError("max_steps=0 would train nothing; use a positive number or -1 to train by epochs")
    if config.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be positive, got {config.learning_rate!r}")
    if config.save_method not in VALID_SAVE_METHODS:
        raise ConfigError(f"save_method must be one of {VALID_SAVE_METHODS}, got {config.save_method!r}")
    if config.save_method == "merged_4bit" and config.full_finetuning:
        raise ConfigError("save_method='merged_4bit' applies to LoRA training; for full fine-tuning use "
                          "'merged_16bit'")
