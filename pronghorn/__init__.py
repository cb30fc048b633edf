"""pronghorn: fast, lean, exact fine-tuning of large language models.

The public names mirror Unsloth's so a script ports by changing its import. Importing this
package does no work: every name is resolved on first use, so import order never matters.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FastLanguageModel": "pronghorn.models.fast_language_model",
    "FastModel": "pronghorn.models.fast_language_model",
    "FastVisionModel": "pronghorn.models.vision.fast_vision_model",
    "VisionDataCollator": "pronghorn.data.vision.collator",
    "UnslothVisionDataCollator": "pronghorn.trainer",
    "is_bfloat16_supported": "pronghorn.models.dtypes",
    "SFTTrainer": "pronghorn.training.sft",
    "SFTConfig": "pronghorn.training.sft",
    "UnslothTrainer": "pronghorn.training.sft",
    "UnslothTrainingArguments": "pronghorn.training.sft",
    "TrainConfig": "pronghorn.config.schema",
    "load_config": "pronghorn.config.loading",
    "patch_model": "pronghorn.models.patching",
    "unpatch_model": "pronghorn.models.patching",
    "enable_gradient_checkpointing": "pronghorn.memory.checkpointing",
    "get_chat_template": "pronghorn.data",
    "list_chat_templates": "pronghorn.data",
    "register_chat_template": "pronghorn.data",
    "ollama_template": "pronghorn.data",
    "standardize_sharegpt": "pronghorn.data",
    "to_sharegpt": "pronghorn.data",
    "apply_chat_template": "pronghorn.data",
    "format_alpaca": "pronghorn.data",
    "load_dataset_file": "pronghorn.data",
    "train_on_responses_only": "pronghorn.data",
    "parse_tool_calls": "pronghorn.data",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pronghorn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
