"""Experimental, off by default: hand each checkpointed layer's MLP gate output from its forward to its backward
recompute through pinned host memory, so the recompute skips the gate GEMM (and, for a 4-bit base, its
dequantization). Measured on an H100 with an 8B model (benchmarks/results/2026-11-22-llama-3.1-8b-stash.md): the
GPU does 10% less work per step, but the step is no shorter, because compute then waits on the copies.

With offloaded checkpointing a decoder layer runs twice (forward, then again in backward); the gate GEMM is
about a quarter of its matmul FLOPs. Its output (``tokens x intermediate`` values, 117 MB for an 8B Llama at
2 x 2048 tokens) is copied to the host on the device-to-host stream in forward and brought back in backward
on the other direction's stream, like the layer inputs of :mod:`pronghorn.memory.offload`. Only the gate is
parked, not gate and up: at ~50 GB/s each way, one output per layer keeps pace with the forward, and in
backward it is fetched one layer ahead with that layer's input, which keeps one gate output more on the GPU
while a layer's backward runs (parking gate and up, as first tried, raised an 8B model's peak memory by
0.2-0.7 GiB). Phi-3's fused ``gate_up`` output is one tensor and is parked whole.

No copy is allowed to fall behind: a layer whose forward finds more bytes still on their way to the host than
it would add parks nothing, and its recompute computes the gate as usual. Stashed copies take pinned memory
from the same budget as the layer inputs and are likewise dropped where the budget has no room; they never
stay on the GPU. :func:`set_stashed_layers` (or ``PRONGHORN_STASH_MLP_LAYERS``) limits how many layers (from
the first) may park; 0 turns it off.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict, deque

import torch

__all__ = ["LayerStash", "active_stash", "begin_forward", "current_stash", "next_layer_stash", "set_stashed_layers"]

_state = threading.local()
# MLP calls whose gate was parked, and those that parked nothing (copies behind, or no host budget left);
# read and reset by benchmarks to see how much of a step the stash covered.
STATS = {"parked": 0, "skipped": 0}
_config = {"layers": int(os.environ.get("PRONGHORN_STASH_MLP_LAYERS", "0") or 0)}


def set_stashed_layers(n: int) -> None:
    """Let the first ``n`` checkpointed layers of every forward stash their MLP gate output (0: off)."""
    if n < 0:
        raise ValueError(f"the number of stashed layers must be >= 0, got {n}")
    _config["layers"] = n


def begin_forward() -> None:
    """A model forward starts: layer counting restarts (called by pronghorn's top-level forward)."""
    _state.layers_seen = 0


def next_layer_stash() -> LayerStash | None:
    """A stash for the checkpointed layer about to run, or None when its position is past the stashed ones."""
    seen = getattr(_state, "layers_seen", 0)
    _state.layers_seen = seen + 1
    return LayerStash() if seen < _config["layers"] else None


class LayerStash:
    """Named groups of tensors parked in host memory between a layer's forward and its recompute. A name may
    be put several times (the tiled MLP runs once per sequence tile); takes return them in the same order."""

    def __init__(self):
        self._entries: dict[str, deque] = defaultdict(deque)

    def put(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Park ``tensors[0]`` (the gate, or Phi-3's fused gate_up) where the copies keep pace and the host
        budget has room; the rest are always recomputed."""
        from pronghorn.memory.offload import OffloadedActivation, copies_in_flight_bytes

        first = tensors[0]
        parked = None
        if copies_in_flight_bytes() <= first.numel() * first.element_size():
            parked = OffloadedActivation(first, link=False, keep_on_device=False)
            if not parked.parked:  # no room in the host budget
                parked.discard()
                parked = None
        STATS["parked" if parked is not None else "skipped"] += 1
        self._entries[name].append(None if parked is None else [parked] + [None] * (len(tensors) - 1))

    def prefetch(self) -> None:
        for groups in self._entries.values():
            for parked in groups:
                for p in parked or ():
                    if p is not None:
                        p.prefetch()

    def take(self, name: str) -> list[torch.Tensor | None] | None:
        """The next group put under ``name``, back on its device (None for a tensor that was not parked); None
        if none is left or nothing was parked."""
        groups = self._entries.get(name)
        parked = groups.popleft() if groups else None
        return None if parked is None else [None if p is None else p.restore() for p in parked]


@contextlib.contextmanager
def active_stash(stash: LayerStash | None):
    """Make ``stash`` the one the enclosed layer code deposits into (forward) or takes from (recompute)."""
    previous = getattr(_state, "stash", None)
    _state.stash = stash
    try:
        yield
    finally:
        _state.stash = previous


def current_stash() -> LayerStash | None:
    return getattr(_state, "stash", None)
