"""Offloaded activation checkpointing: keep each checkpointed layer's input in pinned host memory.

With ordinary checkpointing the only activation a decoder layer keeps between forward and
backward is its input ``hidden_states`` ([batch, seq, hidden]); across ``L`` layers that is
``L * batch * seq * hidden`` elements, which dominates device memory at long context. Here that
input is copied to pinned CPU memory on a side CUDA stream as soon as the layer has read it, and
copied back on the same side stream one layer ahead of the backward pass that needs it, so the
copies overlap with compute and device memory no longer grows with the number of layers.
Pinned host memory is budgeted (:class:`HostBudget`): once the layer inputs would leave less than
:func:`host_reserve_bytes` of host memory, the remaining layers keep their inputs on the GPU.

:func:`offloaded_checkpoint` has the signature of :func:`torch.utils.checkpoint.checkpoint`, so it
plugs into transformers' ``_gradient_checkpointing_func`` hook unchanged. On CPU tensors the
"offload" keeps a reference instead of copying, and the same code path runs.

Gradient semantics are those of reentrant checkpointing: the layer is re-run inside backward and
parameter gradients are accumulated into ``.grad`` by an inner ``torch.autograd.backward``. That
means the outer pass must be ``loss.backward()`` (what every trainer does), not
``torch.autograd.grad``. Unlike torch's reentrant mode, the layer input need not require grad: an
internal anchor tensor that requires grad guarantees the backward runs, so PEFT models work
without ``enable_input_require_grads``.
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import weakref
from typing import Any, Callable

import torch

from pronghorn.kernels.dequant import handoff as dequant_handoff
from pronghorn.memory import layer_graphs
from pronghorn.memory.recompute import backward_recompute
from pronghorn.memory.stash import (
    active_stash,
    fetch_deferred,
    fetch_later,
    next_layer_stash,
)

__all__ = ["offloaded_checkpoint", "OffloadedActivation"]

logger = logging.getLogger(__name__)


def _autocast_state(device_type: str) -> dict[str, Any]:
    """What autocast looked like in forward, so the recompute in backward casts the same way."""
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


class OffloadedActivation:
    """One layer input parked in host memory, with the events that order its two copies.

    Records of one forward pass are linked from each to the one before (weakly, so a record never
    keeps an earlier layer's host buffer alive), which is what lets the backward of layer ``i``
    start bringing back layer ``i-1``'s input while layer ``i`` recomputes.
    """

    _last: "weakref.ref[OffloadedActivation] | None" = None

    def __init__(self, tensor: torch.Tensor, link: bool = True, keep_on_device: bool = True,
                 paces_host: bool = True):
        """Start copying ``tensor`` to pinned host memory. ``link``: chain this record to the previous one
        (layer inputs; see :meth:`prefetch_previous`). ``keep_on_device``: where the host budget has no room,
        keep a reference to ``tensor`` (layer inputs must survive); otherwise park nothing (``parked``
        is False) and let the caller recompute it. ``paces_host``: this copy counts toward the copy lead,
        so the host may wait for it (layer inputs); stashed activations, whose caller bounds the bytes in
        flight itself, never make the host wait (see :class:`_CopySources`)."""
        self.device = tensor.device
        self.shape = tensor.shape
        self.dtype = tensor.dtype
        self._version = tensor._version
        self._restored: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self.stash = None  # the layer's stashed activations (pronghorn.memory.stash)
        self.graph_gate = None  # the MLP gate its graphed forward parked (pronghorn.memory.graph_stash)
        self.previous = OffloadedActivation._last if link else None
        if link:
            OffloadedActivation._last = weakref.ref(self)
        self._host: list[torch.Tensor] | None = None
        self._source: torch.Tensor | None = None
        self._saved: torch.cuda.Event | None = None
        self._host_bytes = _pinned_bytes(tensor.numel(), tensor.element_size())
        self._layer_input = link
        if tensor.is_cuda and HOST_BUDGET.take(self._host_bytes, spare=not link, layer_input=link):
            src = tensor.detach()
            src = src if src.is_contiguous() else src.contiguous()
            self._host, self._saved = copy_to_host(src)
            _COPYING.hold(src, self._saved, paces_host)
        elif not tensor.is_cuda or keep_on_device:
            # Already in host memory (the "copy" is free), or host memory is nearly full: keep a
            # reference where it is and check in backward that nobody modified it in place.
            if tensor.is_cuda:
                _warn_host_full_once(tensor.device)
            self._source = tensor.detach()
        self.parked = self._host is not None or self._source is not None

    def discard(self) -> None:
        """Give up this record (its host copy, if any, is released once the copy stream is done with it)."""
        self._source = self._restored = None
        self._release_host()

    def prefetch(self) -> None:
        """Start the host-to-device copy on the side stream, if not started yet."""
        _COPYING.release_finished()  # forward's last copies are done by now; backward needs the memory
        if self._restored is not None or self._host is None:
            return
        # Allocated from the compute stream, which will use and free it.
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._ready = copy_to_device(self._host, out, self._saved)
        out.record_stream(_side_stream(self.device, "to_device"))
        self._restored = out

    def prefetch_previous(self) -> None:
        """Bring back the input (and stashed activations) of the layer that ran just before this one; a stash
        marked ``late`` only after this layer's MLP backward."""
        fetch_deferred()  # a deferred fetch whose hook did not fire
        prev = self.previous() if self.previous is not None else None
        if prev is not None and prev.device == self.device:
            prev.prefetch()
            gate = prev.graph_gate
            if gate is not None and (self.graph_gate is None or gate.slot is not self.graph_gate.slot):
                gate.prefetch()  # into the other slot than the one this layer's replay is about to read
            if prev.stash is not None:
                if prev.stash.late:
                    fetch_later(prev.stash)
                else:
                    prev.stash.prefetch()

    def restore(self) -> torch.Tensor:
        """The saved tensor, on its original device, safe to use on the current stream."""
        if self._source is not None:
            if self._source._version != self._version:
                raise RuntimeError(
                    "a checkpointed layer's input was modified in place after the forward pass; offloaded "
                    "checkpointing needs the layer input unchanged until backward (do not write into hidden_states)"
                )
            return self._source
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self._ready)
        out, self._restored = self._restored, None
        self._release_host()
        return out

    def _release_host(self) -> None:
        if self._host is not None:
            self._host = None
            HOST_BUDGET.give(self._host_bytes, layer_input=self._layer_input)

    def __del__(self):  # a forward whose backward never ran still returns its share of the budget
        self._release_host()


# Host memory left free for everything else (data loading, the OS, allocator slack, other processes):
# the larger of this and HOST_RESERVE_FRACTION of the machine's memory.
HOST_RESERVE_BYTES = 8 * 2**30
HOST_RESERVE_FRACTION = 0.2


def host_reserve_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return max(HOST_RESERVE_BYTES, int(HOST_RESERVE_FRACTION * total))


def available_host_bytes() -> int | None:
    """Memory the kernel could still give this process (``MemAvailable``, capped by a cgroup v2 limit), or
    None where neither can be read (non-Linux)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                left = int(limit) - int(f.read())
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


# Host copies are made of pinned chunks of this size: PyTorch's pinned-memory cache rounds every
# allocation up to a power of two (a 2.9 GB layer input would take 4 GB) and reuses a block only for a
# request of its size class, so equal power-of-two chunks waste nothing and are reused across steps
# whose sequence lengths differ.
HOST_CHUNK_BYTES = 64 * 2**20


def _chunk_sizes(numel: int, element_size: int) -> list[int]:
    per = max(1, HOST_CHUNK_BYTES // element_size)
    return [min(per, numel - start) for start in range(0, numel, per)] or [0]


def _pinned_bytes(numel: int, element_size: int) -> int:
    """What the pinned chunks of a tensor really occupy, each rounded up to a power of two."""
    return sum(1 << max(0, (n * element_size - 1).bit_length()) for n in _chunk_sizes(numel, element_size))


def copy_to_host(src: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event]:
    """Pinned host chunks of the contiguous device tensor ``src``, filled on the device-to-host stream once the
    current stream's work so far is done, and the event that marks the copy done. The caller keeps ``src``
    unchanged until then."""
    flat = src.view(-1)
    host = [torch.empty(n, dtype=src.dtype, device="cpu", pin_memory=True)
            for n in _chunk_sizes(flat.numel(), src.element_size())]
    stream = _side_stream(src.device, "to_host")
    stream.wait_stream(torch.cuda.current_stream(src.device))
    with torch.cuda.stream(stream):
        for chunk, piece in zip(host, flat.split([h.numel() for h in host])):
            chunk.copy_(piece, non_blocking=True)
        saved = torch.cuda.Event()
        saved.record(stream)
    return host, saved


def copy_to_device(host: list[torch.Tensor], out: torch.Tensor, *after: torch.cuda.Event | None) -> torch.cuda.Event:
    """Fill the contiguous device tensor ``out`` from the pinned chunks ``host`` on the host-to-device stream,
    once the current stream's work so far and the ``after`` events are done; returns the event that marks it
    done."""
    stream = _side_stream(out.device, "to_device")
    stream.wait_stream(torch.cuda.current_stream(out.device))
    for event in after:
        if event is not None:  # e.g. the copy that filled ``host`` (the other direction's stream)
            stream.wait_event(event)
    with torch.cuda.stream(stream):
        for chunk, piece in zip(host, out.view(-1).split([h.numel() for h in host])):
            piece.copy_(chunk, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return ready


class HostBudget:
    """Pinned host bytes that layer inputs may use, and how many they use now.

    The budget is read once, at the first offload, as available host memory minus
    :func:`host_reserve_bytes`: after that, freed pinned blocks stay cached by PyTorch for the next step,
    so the OS's free-memory figure no longer says what offloading may reuse. At very long context the
    layer inputs outgrow host RAM (350K tokens of an 8B model: 92 GB); pinning past it gets the process
    killed by the OS while the GPU may still have room, so the layers beyond the budget keep their
    inputs on the GPU.

    Layer inputs come first: an activation that the recompute could compute instead (a parked MLP gate) takes
    bytes only where the rest of the forward's layer inputs, as many bytes as the largest forward so far has
    offloaded, still fit (``spare=True``).
    """

    def __init__(self):
        self.limit: int | None = None
        self.used = 0
        self.inputs = 0  # bytes of layer inputs held now
        self.inputs_peak = 0  # the most layer-input bytes held at once so far

    def take(self, nbytes: int, spare: bool = False, layer_input: bool = False) -> bool:
        if self.limit is None:
            avail = available_host_bytes()
            self.limit = -1 if avail is None else max(0, avail - host_reserve_bytes())
        wanted = nbytes + (max(0, self.inputs_peak - self.inputs) if spare else 0)
        if self.limit >= 0 and self.used + wanted > self.limit:
            return False
        self.used += nbytes
        if layer_input:
            self.inputs += nbytes
            self.inputs_peak = max(self.inputs_peak, self.inputs)
        return True

    def give(self, nbytes: int, layer_input: bool = False) -> None:
        self.used -= nbytes
        if layer_input:
            self.inputs -= nbytes


HOST_BUDGET = HostBudget()


@functools.lru_cache(maxsize=None)
def _warn_host_full_once(device: torch.device) -> None:
    logger.warning(
        "pronghorn: offloaded layer inputs reached the host memory budget (%.1f GiB, leaving %.1f GiB for "
        "everything else); further checkpointed layer inputs stay in %s memory",
        (HOST_BUDGET.limit or 0) / 2**30, host_reserve_bytes() / 2**30, device
    )


_SIDE_STREAMS: dict[tuple[torch.device, str], torch.cuda.Stream] = {}


def _side_stream(device: torch.device, direction: str) -> torch.cuda.Stream:
    """The copy stream for one direction ("to_host" / "to_device") on ``device``, created on first use so that
    importing this module touches no GPU. PCIe carries both directions at once; on one shared stream the
    first prefetch of a backward would wait behind every device-to-host copy the forward left queued."""
    key = (device, direction)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


# See _CopySources; longer leads were no faster (benchmarks/results/2026-11-22-llama-3.1-8b-inprocess-ab.md).
DEFAULT_COPY_LEAD = 2


class _CopySources:
    """Device tensors that a device-to-host copy still reads, each kept alive until its copy's event has
    completed. ``record_stream`` would also keep the memory safe, but the caching allocator counts such a
    block as freed while it cannot be reused, so peak-memory figures would leave out copies that fall
    behind; holding the reference keeps them counted.

    At most ``limit`` layer inputs are held: a host that runs many layers ahead of the GPU (nothing in the
    step waits for the GPU) would otherwise hold one layer input per layer it is ahead, and carry them into
    backward. Past the limit the host waits for the oldest layer input's copy, which leaves ``limit`` layers of
    work queued on the GPU. Copies that do not pace the host (stashed activations) are held the same way but
    never waited for: one wait per layer input already keeps the host in step, and more waits per layer
    would leave the GPU too little queued work (the stash then made steps slower although the GPU had less
    to do, benchmarks/results/2026-11-22-llama-3.1-8b-stash.md).
    """

    def __init__(self, limit: int = DEFAULT_COPY_LEAD):
        self._pending: collections.deque = collections.deque()  # (tensor, done event, paces the host)
        self.limit = limit

    def hold(self, tensor: torch.Tensor, done: torch.cuda.Event, paces_host: bool = True) -> None:
        self.release_finished()
        if paces_host:
            while sum(paces for _, _, paces in self._pending) >= self.limit:
                self._wait_oldest_pacing()
        self._pending.append((tensor, done, paces_host))

    def _wait_oldest_pacing(self) -> None:
        """Wait for the oldest layer input's copy; the copies queued before it on the one stream are done too."""
        oldest = next(i for i, (_, _, paces) in enumerate(self._pending) if paces)
        self._pending[oldest][1].synchronize()
        for _ in range(oldest + 1):
            self._pending.popleft()

    def release_finished(self) -> None:
        while self._pending and self._pending[0][1].query():
            self._pending.popleft()

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _, _ in self._pending)

    def __len__(self) -> int:
        return len(self._pending)


_COPYING = _CopySources()


def set_copy_lead(layers: int) -> None:
    """How many layer inputs may wait for their copy to the host at once: how many layers of work the host may
    queue ahead of the GPU in the forward pass (see :class:`_CopySources`; default :data:`DEFAULT_COPY_LEAD`)."""
    if layers < 1:
        raise ValueError(f"the copy lead must be at least 1 layer, got {layers}")
    _COPYING.limit = int(layers)


def copies_in_flight_bytes() -> int:
    """Bytes of device tensors whose copy to the host has not finished yet."""
    _COPYING.release_finished()
    return _COPYING.bytes


def _capture_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


class _OffloadedCheckpointFunction(torch.autograd.Function):
    """Runs ``run_function`` without keeping activations; re-runs it in backward from the offloaded input."""

    @staticmethod
    def forward(ctx, run_function, preserve_rng_state, offload_index, anchor, *args):
        del anchor  # only there so that the outputs require grad and backward always runs
        ctx.run_function = run_function
        ctx.offload_index = offload_index
        hidden = args[offload_index]
        ctx.device = hidden.device
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.rng = _capture_rng(hidden.device) if preserve_rng_state else None
        ctx.input_needs_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        ctx.record = OffloadedActivation(hidden)
        graphed = layer_graphs.mode_allows(run_function, hidden)
        ctx.record.stash = stash = next_layer_stash(auto=hidden.is_cuda and not graphed)
        # The other positional arguments are rare (transformers passes hidden_states alone) and small.
        ctx.others = [None if i == offload_index else a for i, a in enumerate(args)]
        outputs = None
        if stash is None and graphed:
            outputs, ctx.record.graph_gate = layer_graphs.run_forward(run_function, args, offload_index)
        if outputs is None:
            with active_stash(stash):
                outputs = run_function(*args)
        if isinstance(outputs, torch.Tensor):
            ctx.single = True
            return outputs
        if isinstance(outputs, tuple) and all(o is None or isinstance(o, torch.Tensor) for o in outputs):
            ctx.single = False
            return outputs
        raise TypeError(
            f"offloaded checkpointing supports layers that return a tensor or a tuple of tensors, got "
            f"{type(outputs).__name__}; use mode='gpu' (standard checkpointing) for this model"
        )

    @staticmethod
    def backward(ctx, *grad_outputs):
        record = ctx.record
        hidden = record.restore()
        record.prefetch_previous()
        args = [hidden if i == ctx.offload_index else a for i, a in enumerate(ctx.others)]
        gate, record.graph_gate = record.graph_gate, None
        if record.stash is None and layer_graphs.layer_graphs_enabled():
            graphed = layer_graphs.run_backward(ctx.run_function, args, ctx.offload_index, ctx.input_needs_grad,
                                                ctx.autocast, grad_outputs, gate)
            if graphed is not None:
                ctx.record = ctx.others = ctx.run_function = None
                return (None, None, None, None, *graphed)
        if gate is not None:
            gate.discard()  # an eager recompute computes the gate
        inputs = [a.detach().requires_grad_(needs) if isinstance(a, torch.Tensor) else a
                  for a, needs in zip(args, ctx.input_needs_grad)]
        with dequant_handoff.recompute_to_backward() as handoff:  # 4-bit weights: dequantized once for both
            outputs = _recompute(ctx, inputs)
            handoff.collecting = False
            pairs = [
                (o, g) for o, g in zip(outputs, grad_outputs)
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
            ]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.record = ctx.others = ctx.run_function = None
        grads = tuple(a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in inputs)
        return (None, None, None, None, *grads)


def _recompute(ctx, inputs: list) -> tuple:
    """The layer's forward again, under the RNG state, autocast and stash of its first run."""
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=ctx.rng is not None):
        if ctx.rng is not None:
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
        with torch.enable_grad(), torch.autocast(**ctx.autocast), backward_recompute(), \
                active_stash(ctx.record.stash):
            outputs = ctx.run_function(*inputs)
    return (outputs,) if ctx.single else outputs


def offloaded_checkpoint(function: Callable, *args, use_reentrant: bool | None = None, **kwargs):
    """Checkpoint ``function(*args)`` keeping its first floating-point tensor argument in host memory.

    Drop-in for :func:`torch.utils.checkpoint.checkpoint` as transformers' gradient checkpointing
    function (``model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=...)``).

    Args:
        function: the layer call; transformers passes ``partial(layer.forward, **kwargs)``.
        *args: positional inputs; the first floating-point tensor (``hidden_states``) is offloaded.
        use_reentrant: accepted for signature compatibility and ignored: this function has its own
            recompute semantics (see the module docstring).
        preserve_rng_state (keyword, default True): replay dropout masks exactly in the recompute.
        Other keyword arguments of ``torch.utils.checkpoint.checkpoint`` (``determinism_check``,
        ``debug``) are accepted and ignored; ``context_fn`` (selective checkpointing) is refused.
    """
    del use_reentrant
    preserve_rng_state = kwargs.pop("preserve_rng_state", True)
    kwargs.pop("determinism_check", None)
    kwargs.pop("debug", None)
    context_fn = kwargs.pop("context_fn", None)
    if context_fn is not None and getattr(context_fn, "__name__", "") != "noop_context_fn":
        raise ValueError("offloaded checkpointing does not support context_fn (selective checkpointing); use mode='gpu'")
    bound = list(kwargs.values()) + (list(function.keywords.values()) if isinstance(function, functools.partial) else [])
    if kwargs:
        # Keyword arguments to the layer itself: bind them, as torch's checkpoint does.
        function = functools.partial(function, **kwargs)

    if not torch.is_grad_enabled():
        return function(*args)
    if _tensors_need_grad(bound):
        # A tensor bound into the layer call (not a positional input) needs a gradient, which the
        # recompute-in-backward path cannot deliver; torch's non-reentrant checkpoint can.
        _warn_fallback_once()
        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state
        )
    offload_index = next(
        (i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()), None
    )
    if offload_index is None:
        raise ValueError(
            "offloaded checkpointing needs the layer's hidden_states as a positional tensor argument; "
            f"got positional argument types {[type(a).__name__ for a in args]}"
        )
    anchor = torch.empty(0, requires_grad=True)
    return _OffloadedCheckpointFunction.apply(function, preserve_rng_state, offload_index, anchor, *args)


def _tensors_need_grad(values: list) -> bool:
    """Whether any tensor in ``values`` (nested in tuples, lists, dicts) requires grad."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif isinstance(value, (tuple, list)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return False


@functools.lru_cache(maxsize=None)
def _warn_fallback_once() -> None:
    logger.warning(
        "pronghorn: a checkpointed layer receives a keyword tensor that requires grad; that layer uses "
        "standard on-GPU checkpointing instead of offloading"
    )
