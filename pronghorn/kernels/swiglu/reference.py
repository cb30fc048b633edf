"""Plain PyTorch SwiGLU: ``silu(gate) * up``, the math the Triton kernels must reproduce."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32 and rounded once to the input dtype.

    Hugging Face's eager MLP rounds twice in low precision (after ``silu`` and after the
    product); the kernel rounds once, so this single-rounding form is the one it is held to.
    """
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
