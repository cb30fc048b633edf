"""MLP gate outputs of CUDA-graphed layers, handed from forward to the backward recompute through host memory.

A checkpointed layer's recompute runs its two large gate/up GEMMs again. Where the forward parks the gate output
in host memory and the recompute reads it back, the gate GEMM runs once instead of twice: for an 8B Llama, a
quarter of the recompute's matmul FLOPs. The eager stash (:mod:`pronghorn.memory.stash`) does this for layers
that run without graphs. This module does it for graphed layers (:mod:`pronghorn.memory.layer_graphs`), whose
replays can only read and write fixed addresses:

- Every graphed layer owns one of two **slots**, device buffers of the gate's shape, taken in turn in the order
  the layers are first captured, so neighbouring layers use different slots. Its forward graph's gate GEMM writes
  into its slot, and its recompute graph reads (and, in the MLP backward, overwrites) the gate there.
- After a forward replay the slot is copied to pinned host memory on the device-to-host stream
  (:class:`ParkedGate`). The next forward replay that writes the slot waits for that copy on the GPU; the host
  never waits.
- In backward the gate comes back into the slot on the host-to-device stream, one layer ahead where the slots
  differ (:meth:`ParkedGate.prefetch`), and the replay waits for it on the GPU.

Correctness never depends on the slots alternating, only on those events; alternation lets a copy overlap
the neighbouring layer's work. A recompute that reads its gate takes the full-width MLP backward, also over a
4-bit base, where it would otherwise be chunked (:mod:`pronghorn.kernels.lora.mlp_chunked`). Parked copies take
pinned memory from the offloaded layer inputs' budget (where it has no room, the layer's recompute computes its
gate as usual).

Measured on an H100 with Llama-3.1-8B at 2 x 2048 tokens (benchmarks/results/2026-11-23-graph-gate-stash.md):
bf16 steps 4.8% faster (12,925 vs 12,328 tokens/s) at a 0.11 GiB higher peak (16.59 GiB), QLoRA steps 8.7%
faster (12,207 vs 11,235) at a 0.48 GiB higher peak (7.19 GiB; Unsloth's is 7.67).
``set_graph_gate_stash(False)`` or ``PRONGHORN_STASH_GRAPHED_GATES=0`` turns it off.
"""
from __future__ import annotations

import os

import torch

# Imported as a module: offload imports layer_graphs, which imports this one.
from pronghorn.memory import offload
from pronghorn.memory.stash import STATS

__all__ = [
    "GateSlot", "ParkedGate", "SlotStash", "enabled", "parks_quantized", "reset", "set_graph_gate_stash", "slot_stash",
]

ENV = "PRONGHORN_STASH_GRAPHED_GATES"
SLOTS = 2  # a layer's gate copies overlap the work of the next layer, which uses the other slot

_WORD = os.environ.get(ENV, "1").strip().lower()
_ON = _WORD not in ("0", "false", "no", "off")
_config = {"on": _ON, "quantized": _ON and _WORD != "float"}


def set_graph_gate_stash(on: bool, quantized: bool = True) -> None:
    """Park (True, the default) or recompute (False) the MLP gate outputs of graphed layers; ``quantized=False``
    leaves those of layers holding 4-bit weights to their recompute, whose chunked MLP backward holds less memory.
    ``PRONGHORN_STASH_GRAPHED_GATES`` (0, or ``float`` for ``quantized=False``) sets it at import. Graphs captured
    before keep what they were captured with; :func:`pronghorn.memory.layer_graphs.reset` drops them."""
    _config.update(on=bool(on), quantized=bool(on and quantized))


def enabled() -> bool:
    return _config["on"]


def parks_quantized() -> bool:
    return _config["quantized"]


class GateSlot:
    """One device buffer that graphs write gates into (forward) and read them from (recompute)."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.empty(shape, dtype=dtype, device=device)
        self.copied_out: torch.cuda.Event | None = None  # the last copy to the host that reads the buffer

    def before_write(self) -> None:
        """Make the current stream wait until the buffer's last copy to the host has read it."""
        if self.copied_out is not None:
            torch.cuda.current_stream(self.buffer.device).wait_event(self.copied_out)


class _Slots:
    def __init__(self):
        self.by_layer: dict[int, int] = {}  # id(layer) -> slot index, in order of first capture
        self.slots: dict[tuple, GateSlot] = {}

    def get(self, layer_id: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> GateSlot:
        index = self.by_layer.setdefault(layer_id, len(self.by_layer) % SLOTS)
        key = (index, tuple(shape), dtype, device)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = GateSlot(shape, dtype, device)
        return slot


_slots = _Slots()


def reset() -> None:
    """Drop the slots (the graphs that read them are dropped with them)."""
    global _slots
    _slots = _Slots()


class SlotStash:
    """Stands in for :class:`pronghorn.memory.stash.LayerStash` while a graphed layer is captured: the forward's
    gate GEMM writes into the layer's slot (:meth:`gate_buffer`, :meth:`put`), the recompute takes it from there
    (:meth:`take`). A layer whose MLP runs more than once per call (the tiled MLP, one call per token tile) parks
    nothing: one slot holds one gate."""

    mlp, residual, late = True, False, False

    def __init__(self, layer_id: int):
        self.layer_id, self.slot, self.count = layer_id, None, 0
        self.puts = 0  # MLP calls seen in the current run of the layer (the capture's warm-up, or the capture)
        self.tiled = False

    def gate_buffer(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The slot buffer the forward's gate GEMM writes in (see ``GateUpStash.into``); None once the layer has
        shown itself tiled."""
        if self.tiled or self.puts:
            return None
        if self.slot is None:
            self.slot = _slots.get(self.layer_id, shape, dtype, device)
        return self.slot.buffer

    def put(self, name: str, tensors: list[torch.Tensor]) -> None:
        self.puts += 1
        gate = tensors[0]
        if self.slot is None:
            self.slot = _slots.get(self.layer_id, gate.shape, gate.dtype, gate.device)
        self.count = len(tensors)
        if gate.data_ptr() != self.slot.buffer.data_ptr():
            self.tiled = True  # a second call's gate (the first one's GEMM wrote into the slot)

    def end_call(self) -> None:
        """One run of the layer (the warm-up, or the capture) is over: the next one starts counting again."""
        self.puts = 0

    def has(self, name: str) -> bool:
        return name == "mlp" and self.slot is not None and not self.tiled

    def take(self, name: str) -> list[torch.Tensor | None] | None:
        if not self.has(name):
            return None
        return [self.slot.buffer] + [None] * (self.count - 1)


def slot_stash(layer_id: int) -> SlotStash:
    """The stand-in for a forward capture; it learns its slot from the gate it is given."""
    return SlotStash(layer_id)


class ParkedGate:
    """A gate copied from its slot to pinned host memory after a forward replay, brought back for the recompute.

    ``parked`` is False where the host budget had no room; the recompute then computes the gate."""

    def __init__(self, stash: SlotStash):
        self.stash, self.slot = stash, stash.slot
        buffer = self.slot.buffer
        self._bytes = offload._pinned_bytes(buffer.numel(), buffer.element_size())
        self._host: list[torch.Tensor] | None = None
        self._ready: torch.cuda.Event | None = None
        self.parked = offload.HOST_BUDGET.take(self._bytes, spare=True)
        STATS["graphed gate"]["parked" if self.parked else "skipped"] += 1
        if self.parked:
            self._host, self.slot.copied_out = offload.copy_to_host(buffer)

    def prefetch(self) -> None:
        """Start copying the gate back into its slot once the current stream's work so far is done (the last
        replay that read the slot) and the slot's last copy out is: on the one device-to-host stream, that copy
        comes at or after the one that filled this host memory."""
        if self._ready is None and self._host is not None:
            self._ready = offload.copy_to_device(self._host, self.slot.buffer, self.slot.copied_out)

    def refetch(self) -> None:
        """Copy the gate back again: a capture's warm-up ran the MLP backward, which writes over its slot."""
        self._ready = None
        self.prefetch()

    def wait(self) -> None:
        """Make the current stream wait until the slot holds this gate, then give the host memory back."""
        self.prefetch()
        self.discard()

    def discard(self) -> None:
        """Give the host memory back; a copy into the slot already started is waited for on the current stream,
        so that no later write to the slot (the next forward) can race it."""
        if self._ready is not None:
            torch.cuda.current_stream(self.slot.buffer.device).wait_event(self._ready)
            self._ready = None
        self._release()

    def _release(self) -> None:
        if self._host is not None:
            self._host = None  # the pinned allocator frees the chunks once the copies that use them are done
            offload.HOST_BUDGET.give(self._bytes)

    def __del__(self):
        self._release()
