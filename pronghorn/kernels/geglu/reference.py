"""Plain PyTorch GeGLU: ``gelu(gate) * up`` with either of PyTorch's GELU forms."""
from __future__ import annotations

import torch
import torch.nn.functional as F

APPROXIMATIONS = ("tanh", "none")


def check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be 'tanh' (gelu_pytorch_tanh, gelu_new) or 'none' "
                         f"(exact erf GELU), got {approximate!r}")


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``F.gelu(gate, approximate=approximate) * up`` in fp32, rounded once to the input dtype."""
    check_approximate(approximate)
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(gate.dtype)
