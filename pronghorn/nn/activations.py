"""Gated-MLP forward for Hugging Face MLP modules, with the fused SwiGLU/GeGLU kernels.

``mlp_forward(module, x)`` computes ``down(act(gate(x)) * up(x))`` reading the projections
from a Llama-style MLP (``gate_proj``/``up_proj``/``down_proj``) or, with ``fused_gate_up``, a
Phi-3-style one (``gate_up_proj`` whose output is ``[gate | up]`` along the last dimension).
The projections are called as modules, so whatever they are (plain, quantised, LoRA-wrapped)
keeps its own forward; only the activation is replaced.
"""
from __future__ import annotations

import torch
from torch import nn

from pronghorn.kernels.geglu import geglu
from pronghorn.kernels.swiglu import swiglu

ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu_exact")

# Hugging Face ``hidden_act`` names whose math equals one of ours exactly.
_HF_ACTIVATIONS = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu_pytorch_tanh": "geglu_tanh",
    "gelu_new": "geglu_tanh",  # same tanh formula as PyTorch's approximate="tanh"
    "gelu": "geglu_exact",
}


def activation_for_hf(hidden_act: str) -> str:
    """Our activation name for a Hugging Face ``config.hidden_act`` (``"silu"`` -> ``"swiglu"``, ...)."""
    try:
        return _HF_ACTIVATIONS[hidden_act]
    except KeyError:
        raise ValueError(f"no fused gated activation for hidden_act={hidden_act!r}; supported: "
                         f"{sorted(_HF_ACTIVATIONS)}") from None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "swiglu", *,
                     inplace_backward: bool = False) -> torch.Tensor:
    """``act(gate) * up`` for ``activation`` in ``"swiglu"``, ``"geglu_tanh"``, ``"geglu_exact"``."""
    if activation == "swiglu":
        return swiglu(gate, up, inplace_backward=inplace_backward)
    if activation == "geglu_tanh":
        return geglu(gate, up, "tanh", inplace_backward=inplace_backward)
    if activation == "geglu_exact":
        return geglu(gate, up, "none", inplace_backward=inplace_backward)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _projection(module: nn.Module, name: str) -> nn.Module:
    proj = getattr(module, name, None)
    if proj is None:
        raise AttributeError(f"{type(module).__name__} has no {name!r}; mlp_forward expects gate_proj/up_proj/"
                             f"down_proj, or gate_up_proj/down_proj with fused_gate_up=True")
    return proj


def mlp_forward(module: nn.Module, x: torch.Tensor, activation: str = "swiglu", fused_gate_up: bool = False,
                inplace_backward: bool = True) -> torch.Tensor:
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the fused activation kernel.

    Args:
        module: a Hugging Face gated MLP (Llama, Mistral, Qwen, Gemma, ...; Phi-3 with ``fused_gate_up``).
        x: its input ``[..., hidden]``.
        activation: ``"swiglu"``, ``"geglu_tanh"`` or ``"geglu_exact"`` (see :func:`activation_for_hf`).
        fused_gate_up: the module has one ``gate_up_proj`` producing ``[gate | up]`` (Phi-3).
        inplace_backward: let the activation's backward overwrite the projection outputs with
            their gradients. Safe here because those outputs are fresh and a linear layer's
            backward does not need its own output.
    """
    if fused_gate_up:
        gate, up = _projection(module, "gate_up_proj")(x).chunk(2, dim=-1)
    else:
        gate, up = _projection(module, "gate_proj")(x), _projection(module, "up_proj")(x)
    h = gated_activation(gate, up, activation, inplace_backward=inplace_backward)
    return _projection(module, "down_proj")(h)


def make_mlp_forward(activation: str = "swiglu", fused_gate_up: bool = False):
    """A ``forward(self, x)`` for binding onto an MLP instance (``types.MethodType(fn, mlp)``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mlp_forward(self, x, activation=activation, fused_gate_up=fused_gate_up)

    forward.__doc__ = f"Gated MLP forward with the fused {activation} kernel (pronghorn)."
    return forward
