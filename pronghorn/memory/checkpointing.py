"""Gradient checkpointing policies, installed through transformers' own checkpointing hook.

``use_gradient_checkpointing`` accepts what Unsloth users pass:

- ``False``: no checkpointing (fastest, most activation memory).
- ``True`` or ``"gpu"``: torch's non-reentrant checkpointing, recomputed layer inputs kept on the GPU.
- ``"offload"`` (alias ``"unsloth"``): checkpointing with each layer input parked in pinned host
  memory (:mod:`pronghorn.memory.offload`), so memory stops growing with depth.

The policy is installed with ``PreTrainedModel._set_gradient_checkpointing(enable=True,
gradient_checkpointing_func=...)``, the hook every ``GradientCheckpointingLayer`` calls in
transformers 5, so no forward is replaced. A Trainer whose ``gradient_checkpointing`` (or, from
transformers 5.2x, ``activation_checkpointing``) argument is true will overwrite the policy with
its own when training starts: trainers built on pronghorn set that argument to False and let
:func:`enable_gradient_checkpointing` own the choice (see :func:`checkpointing_mode`).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from pronghorn.memory.offload import offloaded_checkpoint

__all__ = [
    "CheckpointingChange",
    "checkpointing_mode",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "normalize_checkpointing_mode",
]

logger = logging.getLogger(__name__)

_MODE_ATTR = "_pronghorn_checkpointing_mode"
_ALIASES = {False: False, None: False, True: "gpu", "gpu": "gpu", "offload": "offload", "unsloth": "offload",
            "false": False, "none": False, "true": "gpu"}


@dataclass
class CheckpointingChange:
    """What :func:`enable_gradient_checkpointing` or :func:`disable_gradient_checkpointing` changed.

    ``previous_mode`` is the pronghorn mode before the call (``False`` when off or set by someone
    else); ``layers`` names the modules whose ``gradient_checkpointing`` flag was switched.
    """

    mode: str | bool
    previous_mode: str | bool
    layers: list[str] = field(default_factory=list)
    use_cache_was: bool | None = None


def normalize_checkpointing_mode(mode) -> str | bool:
    """Map a user's ``use_gradient_checkpointing`` value to ``False``, ``"gpu"`` or ``"offload"``."""
    key = mode.lower() if isinstance(mode, str) else mode
    try:
        return _ALIASES[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"use_gradient_checkpointing={mode!r} is not understood; use False, True (or 'gpu'), "
            "'offload' or 'unsloth' (same as 'offload')"
        ) from None


def _base_model(model: torch.nn.Module):
    """The transformers PreTrainedModel under PEFT wrappers."""
    from transformers import PreTrainedModel

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(inner, PreTrainedModel):
        return inner
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(
        f"{type(model).__name__} contains no transformers PreTrainedModel; gradient checkpointing is "
        "installed through transformers' checkpointing hook"
    )


def _checkpoint_function(mode: str):
    if mode == "offload":
        return offloaded_checkpoint
    # Non-reentrant: correct with frozen inputs (PEFT) and with keyword tensors, no input-grad hook needed.
    return functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def checkpointing_mode(model: torch.nn.Module) -> str | bool:
    """The pronghorn checkpointing mode installed on ``model`` (``False`` when none)."""
    return getattr(_base_model(model), _MODE_ATTR, False)


def enable_gradient_checkpointing(model: torch.nn.Module, mode=True) -> CheckpointingChange:
    """Install the checkpointing policy ``mode`` on ``model`` (a transformers model, PEFT-wrapped or not).

    Args:
        model: a ``PreTrainedModel`` or a PEFT model around one.
        mode: ``False``, ``True``/``"gpu"``, ``"offload"`` or ``"unsloth"`` (alias of ``"offload"``).

    Returns:
        A :class:`CheckpointingChange` naming the layers switched and the previous mode. ``mode=False``
        turns checkpointing off (same as :func:`disable_gradient_checkpointing`).

    Also sets ``config.use_cache = False`` (a cache cannot be built under checkpointing, and a cache
    object in a training forward stops transformers from detecting padding-free sequence boundaries).
    """
    normalized = normalize_checkpointing_mode(mode)
    if normalized is False:
        return disable_gradient_checkpointing(model)
    base = _base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(base).__name__} does not support gradient checkpointing (supports_gradient_checkpointing=False); "
            "pass use_gradient_checkpointing=False"
        )
    previous = getattr(base, _MODE_ATTR, False)
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_checkpoint_function(normalized))
    layers = [name for name, m in base.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    setattr(base, _MODE_ATTR, normalized)
    use_cache_was = getattr(base.config, "use_cache", None)
    if use_cache_was:
        base.config.use_cache = False
    logger.info("pronghorn: gradient checkpointing %r on %d modules", normalized, len(layers))
    return CheckpointingChange(mode=normalized, previous_mode=previous, layers=layers, use_cache_was=use_cache_was)


def disable_gradient_checkpointing(model: torch.nn.Module) -> CheckpointingChange:
    """Turn gradient checkpointing off on ``model``; returns what changed."""
    base = _base_model(model)
    previous = getattr(base, _MODE_ATTR, False)
    layers = [name for name, m in base.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    if layers:
        base._set_gradient_checkpointing(enable=False)
    if hasattr(base, _MODE_ATTR):
        delattr(base, _MODE_ATTR)
    return CheckpointingChange(mode=False, previous_mode=previous, layers=layers)
