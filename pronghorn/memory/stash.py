"""Experimental: hand a checkpointed layer's MLP gate/up outputs from its forward to its backward recompute
through pinned host memory, so the recompute skips their two GEMMs.

With offloaded checkpointing a decoder layer runs twice (forward, then again in backward); the gate and up
GEMMs are about half of its matmul FLOPs. Their outputs (``2 x tokens x intermediate`` values, 235 MB for an
8B Llama at 2 x 2048 tokens) can instead be copied to the host on the side stream in forward and brought
back one layer ahead in backward, like the layer inputs of :mod:`pronghorn.memory.offload`. PCIe carries
about 50 GB/s each way on an H100 host, so only the first layers of a forward can be stashed before their
copies would delay backward: :func:`set_stashed_layers` (or ``PRONGHORN_STASH_MLP_LAYERS``) says how many;
0, the default, turns it off. Not yet measured on a GPU: off by default until a benchmark shows the gain.

Stashed copies take pinned memory from the same budget as the layer inputs and are dropped (the recompute
then computes them as usual) where the budget has no room; they never stay on the GPU.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict, deque

import torch

__all__ = ["LayerStash", "active_stash", "begin_forward", "current_stash", "next_layer_stash", "set_stashed_layers"]

_state = threading.local()
_config = {"layers": int(os.environ.get("PRONGHORN_STASH_MLP_LAYERS", "0") or 0)}


def set_stashed_layers(n: int) -> None:
    """Stash the MLP gate/up outputs of the first ``n`` checkpointed layers of every forward (0: off)."""
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
        from pronghorn.memory.offload import OffloadedActivation

        parked = [OffloadedActivation(t, link=False, keep_on_device=False) for t in tensors]
        if not all(p.parked for p in parked):  # no room in the host budget: the recompute computes them
            for p in parked:
                p.discard()
            parked = None
        self._entries[name].append(parked)

    def prefetch(self) -> None:
        for groups in self._entries.values():
            for parked in groups:
                for p in parked or ():
                    p.prefetch()

    def take(self, name: str) -> list[torch.Tensor] | None:
        """The next group put under ``name``, back on its device; None if none is left or it was not parked."""
        groups = self._entries.get(name)
        parked = groups.popleft() if groups else None
        return None if parked is None else [p.restore() for p in parked]


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
