"""README.md model cards that say what a checkpoint is: base model, export method, training settings."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

_METHOD_TEXT = {
    "merged_16bit": "LoRA adapter merged into the base weights (in fp32), saved in {dtype} safetensors; "
                    "loads with plain `transformers`.",
    "merged_4bit": "LoRA adapter merged into the base weights, then quantized to bitsandbytes 4-bit (NF4); "
                   "loads with `transformers` + `bitsandbytes`.",
    "lora": "LoRA adapter only; load it on top of the base model with `peft`.",
    "gguf": "GGUF file(s) for llama.cpp / Ollama / LM Studio ({quant}).",
}


def base_model_name(model: nn.Module) -> str | None:
    """The hub id or path the model was loaded from, if recorded."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping):
        for cfg in peft_config.values():
            if getattr(cfg, "base_model_name_or_path", None):
                return cfg.base_model_name_or_path
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or None


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """LoRA hyper-parameters of the active adapter, as plain values."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not peft_config:
        return {}
    active = getattr(model, "active_adapter", None)
    cfg = peft_config.get(active) if isinstance(active, str) else None
    cfg = cfg or next(iter(peft_config.values()))
    out = {}
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "modules_to_save"):
        value = getattr(cfg, key, None)
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        if value is not None:
            out[key] = value
    return out


def build_model_card(model: nn.Module, method: str, *, dtype: str | None = None, quant: str | None = None,
                     training_settings: Mapping[str, Any] | None = None, files: list[str] | None = None) -> str:
    """Markdown text of a model card for an export of ``model`` by ``method``.

    Args:
        model: the (PEFT) model that was exported.
        method: "merged_16bit", "merged_4bit", "lora" or "gguf".
        dtype / quant: the written dtype or GGUF quantization names, shown in the description.
        training_settings: extra settings to record (e.g. learning rate, epochs, dataset name).
        files: file names in the export, listed at the end.
    """
    base = base_model_name(model)
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["library_name: " + ("peft" if method == "lora" else "transformers"),
              "tags:", "- pronghorn", f"- {method}"]
    if method == "gguf":
        lines.append("- gguf")
    if method == "lora":
        lines.append("- lora")
    lines += ["---", "", f"# {base.split('/')[-1] + ' fine-tune' if base else 'Fine-tuned model'}", ""]
    lines.append(f"- **Base model:** `{base}`" if base else "- **Base model:** unknown (not recorded in the config)")
    lines.append(f"- **Export method:** `{method}` — "
                 + _METHOD_TEXT[method].format(dtype=dtype or "16-bit", quant=quant or ""))
    lines.append("- **Trained with:** pronghorn (LoRA / QLoRA fine-tuning)")
    settings = {**lora_settings(model), **dict(training_settings or {})}
    if settings:
        lines += ["", "## Training settings", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | `{v}` |" for k, v in settings.items()]
    if files:
        lines += ["", "## Files", ""] + [f"- `{f}`" for f in sorted(files)]
    return "\n".join(lines) + "\n"
