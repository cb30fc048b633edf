"""Switching a model between training and inference."""
from __future__ import annotations


def for_training(model, use_gradient_checkpointing: bool = True):
    """Put ``model`` in training mode (dropout on, fast training paths, no KV cache); returns it."""
    model.train()
    _set_use_cache(model, False)
    _set_inference_flag(model, False)
    return model


def for_inference(model):
    """Put ``model`` in inference mode (eval, KV cache on, logits always materialised); returns it."""
    model.eval()
    _set_use_cache(model, True)
    _set_inference_flag(model, True)
    return model


def _set_use_cache(model, value: bool) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = value
        generation_config = getattr(module, "generation_config", None)
        if generation_config is not None and hasattr(generation_config, "use_cache"):
            generation_config.use_cache = value


def _set_inference_flag(model, value: bool) -> None:
    for module in model.modules():
        if hasattr(module, "_pronghorn_patch"):
            module._pronghorn_patch.inference = value
