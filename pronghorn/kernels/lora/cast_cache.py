"""LoRA factors in the compute dtype, cast once per training step instead of once per use.

PEFT keeps adapter weights in float32 while the matmuls run in bf16/fp16, so every use of ``A``/``B``
is a cast, and the q/k/v and gate/up ``A``s are also concatenated. With checkpointing each factor is
used in forward, in the recompute and in backward: several small allocations and kernel launches per
projection per pass, which at training batch sizes left the GPU waiting on the host.

The cache lives from one :func:`begin_step` to the next. The model's top-level forward opens a step;
the recompute and the backward of that step reuse the casts. The optimizer changes the weights only
between steps (after backward, before the next forward), so no step ever sees a stale cast. Outside
a step (kernels called directly, or under ``torch.no_grad``) every call casts afresh. Entries also
carry the source's storage pointer and version, so a weight replaced or edited in place by autograd-
visible ops inside a step is cast again.
"""
from __future__ import annotations

import torch

_entries: dict | None = None


def begin_step() -> None:
    """Start a new step: drop every cached cast (the weights may have changed since the last step)."""
    global _entries
    _entries = {} if torch.is_grad_enabled() else None


def end_steps() -> None:
    """Stop caching until the next :func:`begin_step` (used when a model is unpatched or switched to inference)."""
    global _entries
    _entries = None


def _key(tensors, dtype):
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors) + (dtype,)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``; cached for the current step when one is open."""
    if t is None or t.dtype == dtype:
        return t
    if _entries is None:
        return t.to(dtype)
    key = _key((t,), dtype)
    hit = _entries.get(key)
    if hit is None:
        hit = _entries[key] = t.to(dtype)
    return hit


def cat_rows(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat`` of ``tensors`` (along dim 0) in ``dtype``; cached for the current step when one is open."""
    if len(tensors) == 1:
        return cast(tensors[0], dtype)
    if _entries is None:
        return torch.cat([t.to(dtype) for t in tensors])
    key = ("cat",) + _key(tensors, dtype)
    hit = _entries.get(key)
    if hit is None:
        hit = _entries[key] = torch.cat([t.to(dtype) for t in tensors])
    return hit
