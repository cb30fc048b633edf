"""Decides, per call, whether a Triton kernel can run or the PyTorch reference must.

Triton runs on CUDA tensors, and on CPU tensors only under Triton's interpreter (tests).
Where Triton is missing (Windows, macOS) every op falls back to its reference.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be handled by a Triton kernel on this machine."""
    if not triton_importable():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_on() and all(t.device.type == "cpu" for t in tensors)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any tensor is large enough that 32-bit offsets would overflow (specialise kernels on it)."""
    return any(t.numel() >= 2**31 for t in tensors)


def offsets_need_int64(*tensors: torch.Tensor) -> bool:
    """Whether the furthest element of any tensor (by its strides, as a kernel addresses it) is past int32.

    ``needs_int64`` looks at element counts; a sliced view can reach further into its storage than
    its count suggests, so the strided extent is checked too.
    """
    if needs_int64(*tensors):
        return True
    return any(sum((s - 1) * st for s, st in zip(t.shape, t.stride())) >= 2**31 - 1 for t in tensors if t.numel())
