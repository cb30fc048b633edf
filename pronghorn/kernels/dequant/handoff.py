"""Dense copies of quantized base weights handed from a checkpointed layer's recompute to its backward.

A 4-bit layer recomputed inside backward dequantizes its q/k/v/o/gate/up weights for the recompute's GEMMs,
and its backward then dequantizes the same weights again for the input-gradient GEMMs. Nothing changes a
frozen weight between the two, so inside :func:`recompute_to_backward` the dense copies made while
``collecting`` are kept, up to :data:`KEEP_BYTES` per layer in the order they were made, and each is handed
out once more (to backward) and dropped.

The copies are alive during the layer's MLP backward, where a QLoRA step peaks, so every kept byte adds to
peak memory. Measured on an H100 with an 8B Llama (benchmarks/results/2026-11-22-llama-3.1-8b-dequant-handoff-ab.md):
keeping all six (0.3 GiB) made the QLoRA median step about 17 ms shorter (20 ms together with a 3 ms MLP
change measured alongside) and its peak 0.30 GiB higher, past Unsloth's. The budget keeps the attention weights
(q/k/v/o, 80 MiB there; 3 ms, +0.08 GiB) and lets gate/up be dequantized again.

The state is one module global, like :mod:`pronghorn.kernels.lora.cast_cache`: the autograd engine may run a
backward on another thread than the forward that opened the scope.
"""
from __future__ import annotations

import contextlib

import torch


KEEP_BYTES = 128 * 2**20


class _Handoff:
    """One layer's kept copies, by (weight id, dtype), and the bytes still free in its budget."""

    def __init__(self):
        self.kept: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.collecting = True
        self.room = KEEP_BYTES


_current: _Handoff | None = None


@contextlib.contextmanager
def recompute_to_backward():
    """Within: dense weights made while the yielded handoff is ``collecting`` (set it to False once the
    recompute is done) are kept and returned by the next :func:`take` of the same weight and dtype."""
    global _current
    previous, _current = _current, _Handoff()
    try:
        yield _current
    finally:
        _current.kept.clear()
        _current = previous


def take(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The kept dense copy of ``weight`` in ``dtype``, removed from the handoff; None if there is none."""
    if _current is None:
        return None
    return _current.kept.pop((id(weight), dtype), None)


def offer(weight: torch.Tensor, dtype: torch.dtype, dense: torch.Tensor) -> None:
    """Keep ``dense`` (``weight`` made dense in ``dtype``) for one later :func:`take`, while collecting and while
    it fits in what is left of :data:`KEEP_BYTES`."""
    if _current is None or not _current.collecting:
        return
    size = dense.numel() * dense.element_size()
    if size <= _current.room:
        _current.kept[(id(weight), dtype)] = dense
        _current.room -= size
