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

Every cast a step made is also remembered (its sources weakly, its output kept): the next
:func:`begin_step` refreshes all of them in one ``torch._foreach_copy_`` (casting, and writing the
concatenated ``A``s slice by slice) instead of ~450 separate casts from Python, and the step then finds
them cached. Fused optimizers update weights without bumping their version, so the refresh always copies.

A CUDA graph captured under :func:`graph_reads` reads the cached casts it finds instead of casting inside
the graph (two kernels per factor per replay, 2.5 ms of an 8B step). Replays never ask the cache, so such a
cast is *held*: refreshed at every step and kept alive until :func:`release_held` (when the graphs go).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

_entries: dict | None = None  # cache key -> (cast tensor, record key)
# record key (ids of the sources, dtype, is_cat) -> (weakrefs to the sources, the output buffer): every cast made
# and still in use; _used holds the record keys the current step has used, so factors no longer used stop being
# refreshed.
_recorded: dict = {}
_used: set = set()
_held: dict = {}  # record key -> output buffer, for casts a CUDA graph reads (see graph_reads)
_capturing = False
_steps_begun = 0  # never reset, so a step number is never reused


def current_step() -> int:
    """Which step is open (a number that changes at every :func:`begin_step`), 0 when none is."""
    return _steps_begun if _entries is not None else 0


def begin_step() -> None:
    """Start a new step: recast every factor the last step used (the weights may have changed since)."""
    global _entries, _steps_begun
    if not torch.is_grad_enabled():
        _entries = None
        return
    _entries = {}
    _steps_begun += 1
    _refresh_recorded()


def end_steps() -> None:
    """Stop caching until the next :func:`begin_step` and forget the recorded casts (used when a model is
    unpatched or switched to inference)."""
    global _entries
    _entries = None
    for rec_key in set(_recorded) - set(_held):
        del _recorded[rec_key]
    _used.clear()


def release_held() -> None:
    """Forget which casts graphs read (called when the graphs are dropped): they refresh only while used again."""
    _held.clear()


@contextlib.contextmanager
def graph_reads():
    """Within (a CUDA graph capture, after an uncaptured warm-up of the same call made the casts): a cached cast
    is returned and held (see the module docstring); a cast not in the cache is made afresh and not cached, as
    its buffer would live in the graph's pool."""
    global _capturing
    saved, _capturing = _capturing, True
    try:
        yield
    finally:
        _capturing = saved


def _key(tensors, dtype):
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors) + (dtype,)


@torch.no_grad()  # copies of the factors' values, as the casts made inside the autograd Functions are
def _refresh_recorded() -> None:
    dsts, srcs = [], []
    for rec_key, (refs, out) in list(_recorded.items()):
        sources = [r() for r in refs]
        if (rec_key not in _used and rec_key not in _held) or not _same_layout(sources, out, rec_key[2]):
            del _recorded[rec_key]  # unused last step, or a source freed or replaced by one of another shape
            continue
        dsts += list(out.split([t.shape[0] for t in sources])) if rec_key[2] else [out]
        srcs += sources
        _entries[(("cat",) if rec_key[2] else ()) + _key(sources, rec_key[1])] = (out, rec_key)
    _used.clear()
    if dsts:
        torch._foreach_copy_(dsts, srcs)


def _same_layout(sources, out, is_cat) -> bool:
    if any(t is None or t.device != out.device or t.shape[1:] != out.shape[1:] for t in sources):
        return False
    return sum(t.shape[0] for t in sources) == out.shape[0] if is_cat else sources[0].shape == out.shape


def _lookup(key, make, sources, dtype, is_cat) -> torch.Tensor:
    hit = _entries.get(key)
    if _capturing:
        if hit is None:
            return make()
        _held[hit[1]] = hit[0]
    elif hit is None:
        rec_key = (tuple(map(id, sources)), dtype, is_cat)
        hit = _entries[key] = (make(), rec_key)
        _recorded[rec_key] = ([weakref.ref(t) for t in sources], hit[0])
    _used.add(hit[1])
    return hit[0]


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``; cached for the current step when one is open."""
    if t is None or t.dtype == dtype:
        return t
    if _entries is None:
        return t.to(dtype)
    return _lookup(_key((t,), dtype), lambda: t.to(dtype), (t,), dtype, False)


def cat_rows(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat`` of ``tensors`` (along dim 0) in ``dtype``; cached for the current step when one is open."""
    if len(tensors) == 1:
        return cast(tensors[0], dtype)
    if _entries is None:
        return torch.cat([t.to(dtype) for t in tensors])
    return _lookup(("cat",) + _key(tensors, dtype), lambda: torch.cat([t.to(dtype) for t in tensors]), tensors,
                   dtype, True)
