"""Choosing the compute dtype."""
from __future__ import annotations

import torch

_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def is_bfloat16_supported() -> bool:
    """True when a CUDA GPU that computes in bfloat16 natively is present."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(dtype) -> torch.dtype:
    """None picks bf16 where the GPU supports it, else fp16 on a GPU, else fp32 on CPU."""
    if dtype is None:
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if is_bfloat16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _NAMES:
        return _NAMES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not understood; use None, torch.bfloat16, torch.float16, torch.float32 "
                     f"or one of {sorted(_NAMES)}")
