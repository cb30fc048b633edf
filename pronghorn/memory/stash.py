"""Hand activations of a checkpointed layer from its forward to its backward recompute through pinned host
memory, so the recompute skips the GEMMs that produced them (and, for a 4-bit base, their dequantization).

With offloaded checkpointing (:mod:`pronghorn.memory.offload`) a decoder layer runs twice: forward, then again
inside backward. Two activations can be parked on the device-to-host stream in forward and brought back on the
other direction's stream in backward, one layer ahead, like the layer inputs themselves:

- ``"residual"`` (experimental, off): the residual stream after attention, ``h1 = x + o_proj(attn)``, the input of
  the post-attention norm. Where the attention output goes straight into that residual add (every supported
  family but Gemma 2/3), the recompute then skips the o_proj GEMM: its backward needs only o_proj's input and
  ``x A^T``, and the norm reads the parked ``h1`` (bit-identical to the value forward computed) while
  gradients still flow through the recomputed ``x + o`` graph. ``tokens x hidden`` values, 32 MB per layer of
  an 8B Llama at 2 x 2048 tokens. Measured on an H100 (benchmarks/results/2026-11-22-llama-3.1-8b-residual-stash.md):
  no faster in bf16 and slower in QLoRA: the compute stream then waits on the copies (its idle time while
  copies ran: 89 vs 28 ms over two steps).
  :func:`set_residual_stash` (or ``PRONGHORN_STASH_RESIDUAL=1``) turns it on.
- ``"mlp"`` (off by default): the MLP gate output (117 MB per layer, or Phi-3's fused ``gate_up``), so the
  recompute skips the gate GEMM. :func:`set_stashed_layers` (or ``PRONGHORN_STASH_MLP_LAYERS=n|auto``) picks
  the layers; ``"auto"`` parks every ungraphed layer's gate. Measured on H100s with an 8B model in bf16
  (benchmarks/results/2026-11-23-stash-schedule.md): every gate parked, backward's GPU time fell by 9%, and
  in-process A/B steps were 2-4% shorter, but two standalone runs were 2.6-4.6% slower. The eager bf16 step
  is close to host-bound (its host time per step is about its GPU time), so the GPU's savings rarely show.

No copy is allowed to fall behind: a layer whose forward finds more bytes still on their way to the host than
:data:`IN_FLIGHT` times what it would add parks nothing, and its recompute computes as usual. Stashed copies
never make the host wait (only layer inputs pace it, see ``offload._CopySources``). A stash comes back one layer
ahead, or for ``late`` layers only after the next layer's MLP backward, whose freed memory it then reuses: with
every layer late, parking costs no peak memory. Parked copies take pinned memory from the same budget as the
layer inputs and are likewise dropped where the budget has no room; they never stay on the GPU.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict, deque

import torch

__all__ = [
    "LayerStash", "active_stash", "begin_forward", "current_stash", "fetch_after_grad", "fetch_deferred",
    "fetch_later", "next_layer_stash", "set_residual_stash", "set_stashed_layers",
]

_state = threading.local()
# Per name, puts that parked their tensor and puts that parked nothing (copies behind, or no host budget left);
# read and reset by benchmarks to see how much of a step the stash covered.
STATS: dict[str, dict[str, int]] = defaultdict(lambda: {"parked": 0, "skipped": 0})
# How many tensors' worth of bytes may still be on their way to the host when a layer parks one more. The host
# runs a layer or two ahead of the GPU, so at 1 the previous layer's copy is often still queued.
IN_FLIGHT = 2

ENV_LAYERS = "PRONGHORN_STASH_MLP_LAYERS"
AUTO = "auto"  # every layer on a GPU that is not replayed as a CUDA graph, each fetched late


def _layers(value, source: str) -> int | str:
    value = str(value).strip().lower() or "0"
    if value != AUTO and not value.isdigit():
        raise ValueError(f"{source}={value!r}: expected a number of layers (0: off) or 'auto' (every layer "
                         "that is not graphed)")
    return value if value == AUTO else int(value)


_config = {
    "layers": _layers(os.environ.get(ENV_LAYERS, "0"), ENV_LAYERS),
    "first": 0,
    "late_layers": 0,
    "residual": os.environ.get("PRONGHORN_STASH_RESIDUAL", "0").strip().lower() in ("1", "true", "on", "yes"),
}


def set_stashed_layers(n: int | str, first: int = 0, late_layers: int = 0) -> None:
    """Which checkpointed layers stash their MLP gate output: ``n`` layers from layer ``first`` on (0, the
    default: none), or ``"auto"``: every layer on a GPU that is not replayed as a CUDA graph.

    Layers below ``late_layers`` (with ``"auto"``: all) bring their stash back only once the next layer's MLP
    backward is done, reusing that MLP's freed memory (see :func:`fetch_later`); the others when the next
    layer's backward starts. Backward reaches the first layers last, when most LoRA gradients exist and
    memory peaks; a gate fetched a layer early there would raise the peak."""
    n = _layers(n, "n")
    if min(first, late_layers) < 0:
        raise ValueError(f"the first stashed layer and the late-fetching layers must be >= 0, got {first} and "
                         f"{late_layers}")
    _config.update(layers=n, first=first, late_layers=late_layers)


def fetch_later(stash: LayerStash) -> None:
    """Bring ``stash`` back at the next :func:`fetch_deferred` (the running layer's MLP backward registers one
    through :func:`fetch_after_grad`) instead of now; a stash still waiting is fetched first."""
    fetch_deferred()
    _state.deferred = stash


def fetch_deferred() -> None:
    """Start bringing back the stash that :func:`fetch_later` deferred, if any."""
    stash = getattr(_state, "deferred", None)
    _state.deferred = None
    if stash is not None:
        stash.prefetch()


def fetch_after_grad(tensor: torch.Tensor) -> None:
    """Start the deferred fetch once ``tensor``'s gradient is made (the MLP input's: its backward is done and
    its working memory freed). A take that comes first fetches its own stash, so a hook that never fires only
    costs time."""
    if getattr(_state, "deferred", None) is not None and tensor.requires_grad:
        tensor.register_hook(_fetch_hook)


def _fetch_hook(grad: torch.Tensor) -> None:
    fetch_deferred()


def set_residual_stash(on: bool) -> None:
    """Park (True) or recompute (False, the default) each checkpointed layer's post-attention residual."""
    _config["residual"] = bool(on)


def begin_forward() -> None:
    """A model forward starts: layer counting restarts (called by pronghorn's top-level forward)."""
    _state.layers_seen = 0


def next_layer_stash(auto: bool = False) -> LayerStash | None:
    """A stash for the checkpointed layer about to run, or None when it parks nothing. ``auto``: the default
    (:data:`AUTO`) covers this layer (it runs on a GPU and is not graphed)."""
    seen = getattr(_state, "layers_seen", 0)
    _state.layers_seen = seen + 1
    layers = _config["layers"]
    if layers == AUTO:
        mlp, late = auto, True
    else:
        mlp = _config["first"] <= seen < _config["first"] + layers
        late = seen < _config["late_layers"]
    if not (mlp or _config["residual"]):
        return None
    return LayerStash(mlp=mlp, residual=_config["residual"], late=late)


class LayerStash:
    """Named groups of tensors parked in host memory between a layer's forward and its recompute. A name may
    be put several times (the tiled MLP runs once per sequence tile); takes return them in the same order."""

    def __init__(self, mlp: bool = True, residual: bool = True, late: bool = False):
        self.mlp, self.residual = mlp, residual  # which of the two activations this layer may park
        self.late = late  # fetched back after the next layer's MLP backward (see set_stashed_layers)
        self._entries: dict[str, deque] = defaultdict(deque)

    def put(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Park ``tensors[0]`` (the gate, Phi-3's fused gate_up, or the residual) where the copies keep pace and
        the host budget has room; the rest are always recomputed."""
        from pronghorn.memory.offload import OffloadedActivation, copies_in_flight_bytes

        first = tensors[0]
        parked = None
        if copies_in_flight_bytes() <= IN_FLIGHT * first.numel() * first.element_size():
            parked = OffloadedActivation(first, link=False, keep_on_device=False, paces_host=False)
            if not parked.parked:  # no room in the host budget
                parked.discard()
                parked = None
        STATS[name]["parked" if parked is not None else "skipped"] += 1
        self._entries[name].append(None if parked is None else [parked] + [None] * (len(tensors) - 1))

    def prefetch(self) -> None:
        for groups in self._entries.values():
            for parked in groups:
                for p in parked or ():
                    if p is not None:
                        p.prefetch()

    def has(self, name: str) -> bool:
        """Whether the next :meth:`take` of ``name`` returns a parked tensor (decided before taking it)."""
        groups = self._entries.get(name)
        return bool(groups) and groups[0] is not None

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
