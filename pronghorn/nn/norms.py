"""Replacement ``forward`` functions for Hugging Face norm modules, running pronghorn's kernels.

The wiring layer binds one to a module instance, with the family's quirks as keyword arguments::

    module.forward = functools.partial(rms_norm_forward, module, offset=1.0, cast_mode="gemma")

and restores the class's ``forward`` to undo it. The functions read the module's own parameters
and epsilon on every call, so later weight changes (training, loading) are seen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pronghorn.kernels.layer_norm import layer_norm
from pronghorn.kernels.rms_norm import rms_norm

# Hugging Face spells the epsilon attribute differently across families.
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps")


def module_eps(module: nn.Module) -> float:
    """The epsilon a Hugging Face norm module adds to its variance."""
    for name in _EPS_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise AttributeError(
        f"{type(module).__name__} has none of the epsilon attributes {_EPS_ATTRS}; "
        "pass it through the family spec instead"
    )


def rms_norm_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    *,
    offset: float = 0.0,
    cast_mode: str = "llama",
    in_place_backward: bool = False,
) -> torch.Tensor:
    """Forward of an RMSNorm module (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, GemmaRMSNorm, ...).

    Args:
        module: the norm module; its ``weight`` and epsilon attribute are used.
        hidden_states: ``[..., hidden]``.
        offset: 0.0 for ``w * x`` (Llama family), 1.0 for ``(1 + w) * x`` (Gemma family).
        cast_mode: ``"llama"`` or ``"gemma"``, where the cast back to the input dtype happens.
        in_place_backward: reuse the output-gradient buffer for the input gradient. Safe for a
            pre-norm whose output feeds only linear layers (input_layernorm, post_attention_layernorm
            and the final norm of Llama-style decoders); not for a norm whose output is added straight
            into the residual stream (Gemma-2/3's post-norms), whose gradient buffer is shared.
    """
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"rms_norm_forward: {type(module).__name__} has no weight; it is not an RMSNorm with scale")
    return rms_norm(
        hidden_states, weight, module_eps(module), offset, cast_mode, in_place_backward=in_place_backward
    )


def layer_norm_forward(module: nn.Module, input: torch.Tensor, *, in_place_backward: bool = False) -> torch.Tensor:
    """Forward of a ``torch.nn.LayerNorm`` (with or without weight and bias) through the kernel.

    Args:
        module: an ``nn.LayerNorm`` (or a module with ``normalized_shape``, ``weight``, ``bias``, ``eps``).
        input: ``[..., hidden]``.
        in_place_backward: as for :func:`rms_norm_forward`.

    A norm over more than the last dimension is passed to ``F.layer_norm`` unchanged.
    """
    shape = tuple(module.normalized_shape)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if len(shape) != 1:
        return F.layer_norm(input, shape, weight, bias, module.eps)
    return layer_norm(input, weight, bias, module.eps, in_place_backward=in_place_backward)
