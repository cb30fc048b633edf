"""Glue between PEFT LoRA layers (or plain / bitsandbytes linears) and the fused LoRA kernels.

:func:`lora_parts` reads what a fused projection needs from one layer, or says None where the fused math
would not equal the layer's own forward. The ``fused_*`` helpers take a Hugging Face MLP / attention module,
use the fused path when every projection qualifies, and otherwise run the module's own code, so calling
them is always correct. bitsandbytes is never imported here: its layers are recognised only when the
bitsandbytes module is already loaded (a model cannot hold its layers otherwise).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import nn

from pronghorn.kernels.lora import LoraParts, lora_linear, lora_mlp, lora_qkv, lora_qkv_fused
from pronghorn.kernels.lora.cast_cache import begin_step, current_step, end_steps
from pronghorn.memory.recompute import in_backward_recompute

__all__ = ["LoraParts", "activation_of", "begin_step", "end_steps", "fused_linear_forward", "fused_mlp_forward",
           "fused_o_forward", "fused_qkv_forward", "lora_parts"]


def _bnb_class(name: str):
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), name, None) if bnb is not None else None


def _is_peft_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "lora_dropout"))


def _base_parts(layer: nn.Module) -> Optional[LoraParts]:
    """A plain frozen linear, an NF4/FP4 bitsandbytes Linear4bit, or None."""
    linear4bit, linear8bit = _bnb_class("Linear4bit"), _bnb_class("Linear8bitLt")
    if linear8bit is not None and isinstance(layer, linear8bit):
        # bitsandbytes' int8 matmul also quantizes the activations; a dense matmul would not equal it.
        return None
    if linear4bit is not None and isinstance(layer, linear4bit):
        if getattr(layer.weight, "quant_state", None) is None:
            return None  # not quantized yet (still on the meta/CPU staging path)
    elif type(layer) is not nn.Linear:
        return None  # nn.Linear subclasses (other quantizers, FP8, ...) have forwards of their own
    if layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad):
        return None
    return LoraParts(layer.weight, None, None, 1.0, layer.bias)


def _param_state(layer: nn.Module, name: str) -> tuple:
    p = layer._parameters.get(name)
    return (id(p), p is not None and p.requires_grad, getattr(p, "quant_state", None) is not None)


def _state_key(module: nn.Module) -> tuple:
    """Everything :func:`_compute_parts` reads, in a form that is cheap to compare on every call.

    Built from plain ``__dict__``/``_modules`` lookups: the nn.Module ``__getattr__`` and ``hasattr``
    probes of the full check cost tens of microseconds per projection, paid 21 times per layer per step.
    """
    mods = module._modules
    base = mods.get("base_layer")
    if base is None:
        return (type(module), _param_state(module, "weight"), _param_state(module, "bias"))
    sub = tuple(tuple(map(id, mods[n]._modules.values())) if n in mods else None
                for n in ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"))
    scaling = module.__dict__.get("scaling")
    return (type(module), type(base), _param_state(base, "weight"), _param_state(base, "bias"), sub,
            module._disable_adapters, tuple(module.merged_adapters), repr(module._active_adapter),
            module.__dict__.get("fan_in_fan_out"), tuple(scaling.items()) if isinstance(scaling, dict) else None)


def lora_parts(module: nn.Module) -> Optional[LoraParts]:
    """What the fused kernels need from ``module``, or None when its own forward must be called.

    The answer is cached on the module and recomputed when anything it depends on changes (adapters
    enabled/disabled, merged, switched, added or removed; weights replaced, quantized or unfrozen). A layer
    recomputed inside backward takes the answer its forward checked in the same step without checking again:
    the recompute must run exactly what that forward ran, so the module cannot have changed in between.

    Args:
        module: a PEFT ``lora.Linear`` (over ``nn.Linear`` or bitsandbytes ``Linear4bit``), a plain
            ``nn.Linear`` or a bitsandbytes ``Linear4bit`` (A/B None: a plain frozen linear).

    Returns ``LoraParts(weight, A, B, scale, bias)``, or None for: adapters disabled or merged, more than one
    active adapter, lora_dropout > 0 (not ``nn.Identity``), DoRA or any other LoRA variant, a LoRA bias,
    ``fan_in_fan_out``, a trainable base weight/bias, int8 (``Linear8bitLt``) bases, and any other layer type.
    A frozen base bias is supported (added in forward, no gradient).
    """
    cached = module.__dict__.get("_pronghorn_lora_parts")
    step = current_step()
    if cached is not None and step and cached[2] == step and in_backward_recompute():
        return cached[1]
    key = _state_key(module)
    if cached is not None and cached[0] == key:
        parts = cached[1]
    else:
        parts = _compute_parts(module)
    module.__dict__["_pronghorn_lora_parts"] = (key, parts, step)
    return parts


def _compute_parts(module: nn.Module) -> Optional[LoraParts]:
    if not _is_peft_lora_layer(module):
        return _base_parts(module)
    if module.merged or module.disable_adapters or getattr(module, "fan_in_fan_out", False):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    base = module.get_base_layer()
    parts = _base_parts(base)
    if parts is None or len(active) > 1:
        return None
    if not active:
        return parts  # PEFT runs the base layer alone
    name = active[0]
    if not isinstance(module.lora_dropout[name], nn.Identity):
        return None
    if (module.use_dora.get(name, False) or name in module.lora_magnitude_vector
            or module.lora_bias.get(name, False) or name in getattr(module, "lora_variant", {})):
        return None
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_b.bias is not None:
        return None
    return parts._replace(A=lora_a.weight, B=lora_b.weight, scale=float(module.scaling[name]))


_PROBE = None


def activation_of(mlp: nn.Module) -> Optional[str]:
    """Which fused activation equals ``mlp``'s (``act_fn`` or ``activation_fn``), by evaluating it on a probe.

    Returns "swiglu", "geglu_tanh", "geglu_exact", or None when it matches none of them. Call it once at
    patch time, not per step.
    """
    global _PROBE
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if not callable(act):
        return None
    if _PROBE is None:
        _PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    with torch.no_grad():
        got = act(_PROBE.clone())
    candidates = {
        "swiglu": torch.nn.functional.silu(_PROBE),
        "geglu_tanh": torch.nn.functional.gelu(_PROBE, approximate="tanh"),
        "geglu_exact": torch.nn.functional.gelu(_PROBE),
    }
    for name, want in candidates.items():
        if got.shape == want.shape and torch.allclose(got.to(want.dtype), want, rtol=1e-9, atol=1e-9):
            return name
    return None


def _original(module: nn.Module, fallback: Optional[Callable]) -> Callable:
    # The class's forward is Hugging Face's own even when the wiring rebinds forward on the instance.
    return fallback if fallback is not None else type(module).forward.__get__(module)


def fused_mlp_forward(mlp: nn.Module, x: torch.Tensor, activation: str,
                      fallback: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      output_unused: bool = False, stash=None) -> torch.Tensor:
    """A gated MLP's output through :func:`lora_mlp` when all its projections qualify, else ``fallback(x)``.

    Args:
        mlp: a Hugging Face gated MLP with ``gate_proj``/``up_proj``/``down_proj`` or Phi-3's
            ``gate_up_proj``/``down_proj``, whose projections may be PEFT LoRA layers.
        x: its input ``[..., hidden]``.
        activation: "swiglu", "geglu_tanh" or "geglu_exact" (see :func:`activation_of`).
        fallback: called as ``fallback(x)`` when the fused path does not apply; defaults to the MLP
            class's own forward (so it is safe to bind this function as the instance's forward).
        output_unused: passed to :func:`lora_mlp` (skip the down GEMM when only gradients are needed).
        stash: passed to :func:`lora_mlp` (gate/up outputs handed from forward to the backward recompute).
    """
    fused = hasattr(mlp, "gate_up_proj")
    names = ("gate_up_proj", "down_proj") if fused else ("gate_proj", "up_proj", "down_proj")
    parts = [lora_parts(getattr(mlp, n)) if hasattr(mlp, n) else None for n in names]
    if any(p is None for p in parts):
        return _original(mlp, fallback)(x)
    if fused:
        return lora_mlp(x, parts[0], None, parts[1], activation, fused_gate_up=True, output_unused=output_unused,
                        stash=stash)
    return lora_mlp(x, parts[0], parts[1], parts[2], activation, output_unused=output_unused, stash=stash)


def fused_qkv_forward(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flat ``(q, k, v)`` projections ``[..., heads * head_dim]`` of an attention module's input.

    Uses :func:`lora_qkv` (or, for Phi-3's ``qkv_proj``, :func:`lora_qkv_fused` split by the config's head
    counts) when all projections qualify; otherwise calls the projection modules themselves.
    """
    if hasattr(attn, "qkv_proj"):
        cfg = attn.config
        head_dim = attn.head_dim
        sizes = (cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim,
                 cfg.num_key_value_heads * head_dim)
        parts = lora_parts(attn.qkv_proj)
        if parts is None:
            return tuple(attn.qkv_proj(x).split(list(sizes), dim=-1))
        return lora_qkv_fused(x, parts, sizes)
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    parts = [lora_parts(m) for m in mods]
    if any(p is None for p in parts):
        return tuple(m(x) for m in mods)
    return lora_qkv(x, *parts)


def fused_linear_forward(module: nn.Module, x: torch.Tensor, output_unused: bool = False) -> torch.Tensor:
    """``module(x)`` through :func:`lora_linear` when :func:`lora_parts` applies, else the module's forward.

    ``output_unused``: passed to :func:`lora_linear` (a backward recompute skips the GEMM and returns zeros);
    a module without a fused path computes its output anyway. Do not bind this as ``module.forward`` of the
    same module: the fallback calls ``module(x)``.
    """
    parts = lora_parts(module)
    if parts is None:
        return module(x)
    return lora_linear(x, *parts, output_unused=output_unused)


def fused_o_forward(attn: nn.Module, x: torch.Tensor, output_unused: bool = False) -> torch.Tensor:
    """The attention output projection ``o_proj(x)`` (Llama-style naming), fused where possible."""
    return fused_linear_forward(attn.o_proj, x, output_unused)
