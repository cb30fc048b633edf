"""CUDA graphs of checkpointed decoder layers: one launch per layer and pass instead of hundreds from Python.

With offloaded checkpointing (:mod:`pronghorn.memory.offload`) every decoder layer runs twice per step: a
forward without autograd, then, inside backward, a recompute with autograd and its backward. Issuing those
kernels one by one from Python takes the host about as long as the GPU needs to run them, so a slow or busy host
leaves the GPU idle. A layer called again with the same shapes and adapter state launches the same kernels on
the same weights, so from its second call on, its forward and its recompute-plus-backward are each captured
once and then replayed.

Measured on an H100 (benchmarks/results/2026-11-22-layer-graphs.md): the host then issues the backward in a
third of the time, and slow, host-caused steps disappear. But that GPU runs at its power limit, so standalone
Llama-3.1-8B steps were no shorter, and the graphs' pool added 0.25-0.30 GiB to peak memory. A captured recompute
over a quantized base leaves its MLP to the chunked backward (:mod:`pronghorn.kernels.lora.mlp_chunked`), which
shrank the pool from 0.98 to 0.76 GiB. On an H100 whose host could not keep up, graphs took an 8B QLoRA step from
1.08x to 1.27x Unsloth (benchmarks/results/2026-11-22-mlp-chunked.md). Captured attention takes cuDNN at once
(:func:`pronghorn.nn.attention.graph_capture_calls`). Graphed bf16 layers, with a full-width MLP, were then as fast
as eager ones where the host kept up and 12% faster where it did not, but peaked at Unsloth's memory
(benchmarks/results/2026-11-23-graph-attention.md), until the memory below was freed.

What keeps a replay equal to running the layer:

- Inputs are copied into static buffers shared by all layers: the layer input and upstream gradient on every
  call, the bound keyword tensors (RoPE cos/sin, masks) only when they are other tensors than last time.
- Outputs leave a graph through static buffers outside its memory pool, so no graph keeps intermediates alive
  after it ends and all graphs share one pool, about one layer's working set.
- Parameter gradients leave the graph through a scratch buffer and reach ``.grad`` after the replay as autograd
  would put them there (new tensors, or added to the ones there), see :class:`_ParamGrads`.
- LoRA factors are read from the step's cast cache, which refreshes the buffers a graph reads every step and
  keeps them until the graphs are dropped (:func:`pronghorn.kernels.lora.cast_cache.graph_reads`); autocast's
  weight cache is off while capturing.
- A forward graph writes the layer's MLP gate into a slot, from which it goes to host memory and comes back for
  the recompute graph, which then skips the gate GEMM (:mod:`pronghorn.memory.graph_stash`; its recompute then
  takes the full-width MLP backward, also over a 4-bit base).

A call is graphed only where replaying cannot differ from running: CUDA tensors, no dropout, no stash, no
gradient hooks on the layer's parameters, no distributed training, arguments that are tensors or plain values,
and at most :data:`MAX_SHAPES` layer-input shapes (data of many lengths would otherwise capture without end).
Whatever a capture cannot hold (a host sync, say) makes it fail; that call signature then stays eager.

By default (``"auto"``, see :func:`set_layer_graphs`) every layer is graphed whose attention is not eager. Until
2026-11-23 only layers holding a 4-bit weight were: graphed bf16 layers then peaked at Unsloth's memory. Frozen
input embeddings in host memory (:mod:`pronghorn.memory.host_embedding`) freed 0.98 GiB, and graphs stopped
casting LoRA factors in-graph. Graphed bf16 Llama-3.1-8B steps then ran 1.4% faster than eager ones (327 vs 332 ms)
at 16.48 GiB against Unsloth's 17.32 (benchmarks/results/2026-11-23-host-embedding.md).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pronghorn.kernels.dequant import handoff as dequant_handoff
from pronghorn.kernels.dequant.weights import is_4bit
from pronghorn.kernels.lora import cast_cache
# Imported as a module: graph_stash imports offload, which imports this one.
from pronghorn.memory import graph_stash
from pronghorn.memory.recompute import backward_recompute
from pronghorn.memory.stash import active_stash
from pronghorn.memory.tiled_mlp import is_tiled
from pronghorn.nn.attention import graph_capture_calls
from pronghorn.nn.positions import holds_one_sequence_per_row, one_sequence_positions

__all__ = [
    "layer_graphs_enabled", "mode_allows", "pool_bytes", "reset", "run_backward", "run_forward", "set_layer_graphs",
]

logger = logging.getLogger(__name__)

MAX_SHAPES = 4  # distinct layer-input shapes that get graphs; the rest of the shapes run eagerly
CAPTURE_AT = 2  # the call (per signature) that captures; earlier calls run eagerly and warm everything up

MODES = ("auto", "quantized", "on", "off")
ENV = "PRONGHORN_CUDA_GRAPHS"
_ENV_WORDS = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}


def _mode(value: str | bool, source: str) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = _ENV_WORDS.get(value.strip().lower(), value.strip().lower())
    if mode not in MODES:
        raise ValueError(f"{source}={value!r}: CUDA graphs of checkpointed layers must be one of {MODES} "
                         "(or True/False, 1/0)")
    return mode


_config = {"mode": _mode(os.environ.get(ENV, "auto"), ENV)}


def set_layer_graphs(mode: str | bool) -> None:
    """Which checkpointed layers replay as CUDA graphs: ``"auto"`` (the default) those whose attention is not
    eager, ``"quantized"`` only those of them holding a 4-bit weight, ``"on"`` (or True) all, ``"off"`` (or
    False) none.
    ``PRONGHORN_CUDA_GRAPHS`` sets it at import. A change of mode drops the graphs captured so far."""
    mode = _mode(mode, "mode")
    if mode != _config["mode"]:
        reset()
    _config["mode"] = mode


def layer_graphs_enabled() -> bool:
    """Whether any layer may be graphed (the mode is not ``"off"``)."""
    return _config["mode"] != "off"


class _Ineligible(Exception):
    """A layer call that must run eagerly; the message says why."""


class _State:
    """Every captured graph, the static buffers they read and write, and the pool their intermediates share."""

    def __init__(self):
        self.graphs: dict[tuple, _Graph] = {}
        self.replays = 0
        self.calls: dict[tuple, int] = {}
        self.failed: dict[tuple, str] = {}
        self.shapes: set[tuple] = set()
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.last_copied: dict[tuple, tuple] = {}
        self.pool = None
        self.stream: torch.cuda.Stream | None = None


_state = _State()


def reset() -> None:
    """Drop every graph and buffer (their memory returns to PyTorch's cache)."""
    global _state
    _state = _State()
    cast_cache.release_held()
    graph_stash.reset()


# ------------------------------------------------------------------------------------------- signatures


def _layer_of(function: Callable) -> nn.Module | None:
    """The module a checkpointed call runs: transformers passes ``partial(layer.__call__, **kwargs)``."""
    if not isinstance(function, functools.partial):
        return None
    owner = getattr(function.func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _describe(value: Any, tensors: list) -> Any:
    """A hashable description of ``value`` with its tensors appended to ``tensors`` (by shape, not value)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        marked = holds_one_sequence_per_row(value)
        return ("tensor", tuple(value.shape), value.dtype, value.stride(), value.device, value.requires_grad, marked)
    if value is None or type(value) in (bool, int, float, str):
        return (type(value), value)
    if type(value) in (tuple, list):
        return (type(value), tuple(_describe(v, tensors) for v in value))
    if type(value) is dict:
        return (dict, tuple((k, _describe(v, tensors)) for k, v in value.items()))
    raise _Ineligible(f"an argument of type {type(value).__name__}")


def _rebuild(value: Any, tensors) -> Any:
    """``value`` with its tensors replaced, in order, by those of the iterator ``tensors``."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if type(value) in (tuple, list):
        return type(value)(_rebuild(v, tensors) for v in value)
    if type(value) is dict:
        return {k: _rebuild(v, tensors) for k, v in value.items()}
    return value


def _layer_state(layer: nn.Module) -> tuple:
    """What decides the kernels a layer launches besides its arguments: training mode, which parameters train,
    and each LoRA projection's adapter state (enabled, merged, active adapter, scale)."""
    from pronghorn.nn.lora import _state_key

    cached = layer.__dict__.get("_pronghorn_graph_modules")
    if cached is None:
        modules = [m for m in layer.modules() if "base_layer" in m._modules]
        params = list(layer.parameters())
        cached = layer.__dict__["_pronghorn_graph_modules"] = (modules, params)
    modules, params = cached
    return (layer.training, tuple(p.requires_grad for p in params), tuple(_state_key(m) for m in modules))


def _graphed_by_mode(layer: nn.Module | None, mode: str) -> bool:
    """Whether the ``"auto"`` or ``"quantized"`` mode graphs ``layer``: its attention does not materialize the
    score matrix, and (``"quantized"``) it holds a 4-bit weight. Eager attention (Gemma 2's softcapping without
    flash-attn) would keep its ``[batch, heads, seq, seq]`` scores and probabilities in the graphs' pool: 3.2 GiB
    for Gemma-2-9B at 2 x 2048."""
    if layer is None:
        return False
    attention = getattr(layer, "self_attn", None)
    config = getattr(attention, "config", None) or getattr(layer, "config", None)
    if getattr(config, "_attn_implementation", None) == "eager":
        return False
    return mode == "auto" or _holds_4bit(layer)


def _holds_4bit(layer: nn.Module) -> bool:
    held = layer.__dict__.get("_pronghorn_holds_4bit")
    if held is None:
        held = layer.__dict__["_pronghorn_holds_4bit"] = any(is_4bit(p) for p in layer.parameters())
    return held


def _parks_gate(layer: nn.Module) -> bool:
    """Whether this layer's graphs hand its MLP gate from forward to recompute (:mod:`.graph_stash`)."""
    return graph_stash.enabled() and (graph_stash.parks_quantized() or not _holds_4bit(layer))


def _check_layer(layer: nn.Module) -> list[nn.Parameter]:
    """The layer's trainable parameters; raises :class:`_Ineligible` where a replay could differ from a run."""
    trainable = [p for p in layer.parameters() if p.requires_grad]
    for m in layer.modules():
        if m.training and ((isinstance(m, nn.Dropout) and m.p > 0) or getattr(m, "attention_dropout", 0) > 0):
            raise _Ineligible(f"dropout in {type(m).__name__} (a replay would repeat the first mask)")
    for p in trainable:
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            raise _Ineligible("a gradient hook on a parameter (a graph adds gradients without running hooks)")
    if any(is_tiled(m) for m in layer.modules()):
        raise _Ineligible("a tiled MLP (its backward adds its parameters' gradients to .grad itself)")
    return trainable


def _signature(phase: str, function: Callable, args: tuple) -> tuple[tuple, list, Any]:
    """``(key, tensors, structure)`` of a call: the key holds everything a replay depends on besides tensor
    values; the tensors are the call's, in the order :func:`_rebuild` puts them back."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise _Ineligible("distributed training (gradient hooks of DDP/FSDP)")
    if torch.cuda.is_current_stream_capturing():
        raise _Ineligible("already inside a CUDA graph capture")
    layer = _layer_of(function)
    if layer is None:
        raise _Ineligible("the checkpointed function is not a module call")
    tensors: list[torch.Tensor] = []
    structure = (list(args), function.args, function.keywords)
    spec = _describe(structure, tensors)
    if not all(t.is_cuda for t in tensors):
        raise _Ineligible("an argument is not a CUDA tensor")
    return (phase, id(layer), spec, _layer_state(layer)), tensors, structure


# ---------------------------------------------------------------------------------------------- buffers


def _buffer(slot: Any, like: torch.Tensor, marked: bool = False) -> torch.Tensor:
    """The static buffer for ``slot`` shaped like ``like``, shared by every graph that has such an input."""
    key = (slot, tuple(like.shape), like.dtype, like.stride(), like.device)
    buf = _state.buffers.get(key)
    if buf is None:
        if marked:  # 0..S-1 in every row, known without copying; its mark spares attention a host sync
            buf = one_sequence_positions(like.shape[-1], like.device).expand(like.shape)
        else:
            buf = torch.empty_like(like)
        _state.buffers[key] = buf
    return buf


def _fill(buf: torch.Tensor, src: torch.Tensor, always: bool) -> None:
    """Copy ``src`` into ``buf`` unless it is the tensor (unchanged) copied there last time."""
    if holds_one_sequence_per_row(buf):
        return
    key = id(buf)
    last = _state.last_copied.get(key)
    if always or last is None or last[0] is not src or last[1] != src._version:
        buf.copy_(src)
        _state.last_copied[key] = (src, src._version)


class _ParamGrads:
    """Where a graphed backward leaves its parameters' gradients, and how they reach ``.grad``.

    The graph copies them into one flat scratch buffer per dtype, outside its pool and shared by every layer of
    the same layout. After each replay they are handed over as autograd would: a new tensor where ``.grad`` is
    None (one clone of the flat buffer, viewed per parameter), added to ``.grad`` otherwise (accumulation). So
    gradients live as long as with eager layers, until ``zero_grad`` frees them, and one layer's scratch is all
    that stays allocated.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.groups: list[tuple[list[nn.Parameter], torch.Tensor, list[int]]] = []

    def write(self, grads: list) -> None:
        """Inside the graph: copy the gradients (one per parameter, None where unused) into the scratch."""
        used = [p for p, g in zip(self.params, grads) if g is not None]
        given = {id(p): g for p, g in zip(self.params, grads) if g is not None}
        self.groups = []
        for dtype in dict.fromkeys(p.dtype for p in used):
            ps = [p for p in used if p.dtype == dtype]
            sizes = [p.numel() for p in ps]
            key = ("param grads", dtype, tuple(sizes), ps[0].device)
            flat = _state.buffers.get(key)
            if flat is None:
                flat = _state.buffers[key] = torch.empty(sum(sizes), dtype=dtype, device=ps[0].device)
            torch._foreach_copy_(_views(flat, ps, sizes), [given[id(p)] for p in ps])
            self.groups.append((ps, flat, sizes))

    def hand_off(self) -> None:
        """After a replay: add the scratch to each ``.grad``, or make it the ``.grad`` where there is none."""
        for ps, flat, sizes in self.groups:
            if all(p.grad is None for p in ps):
                for p, g in zip(ps, _views(flat.clone(), ps, sizes)):
                    p.grad = g
                continue
            dst, src = [], []
            for p, g in zip(ps, _views(flat, ps, sizes)):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    dst.append(p.grad)
                    src.append(g)
            if dst:
                torch._foreach_add_(dst, src)


def _views(flat: torch.Tensor, params: list, sizes: list[int]) -> list[torch.Tensor]:
    return [v.view_as(p) for v, p in zip(flat.split(sizes), params)]


# ---------------------------------------------------------------------------------------------- graphs


class _Graph:
    """One captured layer call: its graph and the static tensors it reads and writes."""

    def __init__(self, graph, inputs, outputs=(), single=True, grad_out=None, grad_in=None, param_grads=None,
                 gate: graph_stash.SlotStash | None = None):
        self.graph = graph
        self.gate = gate if gate is not None and gate.has("mlp") else None  # forward: the slot it fills
        self.inputs = inputs  # [(static buffer, copy every call)] in the order of the call's tensors
        self.outputs, self.single = list(outputs), single  # forward: static output buffers
        self.grad_out, self.grad_in = grad_out, grad_in
        self.param_grads = param_grads  # backward: a _ParamGrads

    def load(self, tensors: list[torch.Tensor]) -> None:
        _load_inputs(self.inputs, tensors)


def _load_inputs(inputs: list, tensors: list[torch.Tensor]) -> None:
    for (buf, always), src in zip(inputs, tensors):
        _fill(buf, src, always)


def _capture(body: Callable[[bool], None], device: torch.device) -> torch.cuda.CUDAGraph:
    """Run ``body(warm=True)`` once on the capture stream (lazy initialisation stays out of the graph), then
    capture ``body(warm=False)``. The caller replays the graph for this call's result."""
    if _state.pool is None:
        _state.pool = torch.cuda.graph_pool_handle()
        _state.stream = torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(_state.stream), graph_capture_calls():
        body(True)
        torch.cuda.synchronize(device)
        graph.capture_begin(pool=_state.pool, capture_error_mode="thread_local")
        try:
            body(False)
        except BaseException:
            try:
                graph.capture_end()
            except RuntimeError:
                pass
            raise
        graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(_state.stream)
    return graph


def _casts(warm: bool):
    """The warm-up casts LoRA factors through the step's cache like an eager call; the capture then reads those
    buffers, which the cache holds and refreshes every step for as long as the graphs live."""
    return contextlib.nullcontext() if warm else cast_cache.graph_reads()


def _autocast(device: torch.device, state: tuple):
    """Autocast as ``state`` (enabled, dtype) with its weight cache off: a cast cached during capture would live
    in the graph's pool, and one cached before capture would be freed while the graph still reads it."""
    return torch.autocast(device.type, dtype=state[1], enabled=state[0], cache_enabled=False)


_EAGER = (None, None, None, None)


def mode_allows(function, hidden: torch.Tensor) -> bool:
    """Whether the mode lets this call be graphed; asked first, so an ungraphed layer costs the host nothing more."""
    mode = _config["mode"]
    if mode == "off" or not hidden.is_cuda:
        return False
    return mode == "on" or _graphed_by_mode(_layer_of(function), mode)


def _lookup(phase: str, function, args: tuple, hidden_index: int, extra: tuple):
    """``(key, graph, tensors, structure)`` of this call (see :func:`_signature`). ``graph`` None means run it
    eagerly (ineligible, failed, too many shapes, or not called :data:`CAPTURE_AT` times yet); "capture" means
    capture it now. The mode is asked before (:func:`mode_allows`)."""
    try:
        key, tensors, structure = _signature(phase, function, args)
    except _Ineligible as e:
        _note_eager(("ineligible", str(e)), str(e))
        return _EAGER
    key += extra
    graph = _state.graphs.get(key)
    if graph is not None:
        return key, graph, tensors, structure
    if key in _state.failed:
        return _EAGER
    shape = tuple(args[hidden_index].shape)
    if shape not in _state.shapes and len(_state.shapes) >= MAX_SHAPES:
        return _EAGER
    calls = _state.calls[key] = _state.calls.get(key, 0) + 1
    if calls < CAPTURE_AT:
        return _EAGER
    _state.shapes.add(shape)
    return key, "capture", tensors, structure


def _replay(graph: _Graph) -> None:
    graph.graph.replay()
    _state.replays += 1


def _note_eager(key, reason: str) -> None:
    if key not in _state.failed:
        _state.failed[key] = reason
        logger.info("pronghorn: a checkpointed layer runs without CUDA graphs: %s", reason)


def _static_call(function, spec, static_tensors):
    """``function`` and its positional arguments with every tensor replaced by its static buffer."""
    args, fargs, fkw = _rebuild(spec, iter(static_tensors))
    return functools.partial(function.func, *fargs, **fkw), args


def _static_inputs(tensors: list, hidden: torch.Tensor) -> list:
    """``[(buffer, copy every call)]`` for a call's tensors, filled with this call's values."""
    inputs = []
    for i, t in enumerate(tensors):
        if t is hidden:
            inputs.append((_buffer("hidden", t), True))
        else:
            inputs.append((_buffer(("arg", i), t, marked=holds_one_sequence_per_row(t)), False))
    _load_inputs(inputs, tensors)
    return inputs


def _outputs(result) -> tuple[list, bool]:
    single = isinstance(result, torch.Tensor)
    outs = [result] if single else list(result) if isinstance(result, tuple) else None
    if outs is None or any(o is not None and not isinstance(o, torch.Tensor) for o in outs):
        raise _Ineligible(f"the layer returned a {type(result).__name__}, not a tensor or a tuple of tensors")
    return outs, single


def _try_capture(key, body, device) -> torch.cuda.CUDAGraph | None:
    try:
        return _capture(body, device)
    except Exception as e:  # noqa: BLE001 - any failure leaves this signature eager, with the reason logged
        _note_eager(key, f"capture failed, {type(e).__name__}: {e}")
        return None


# ------------------------------------------------------------------------------------------------ forward


def run_forward(function: Callable, args: tuple, hidden_index: int) -> tuple[Any, graph_stash.ParkedGate | None]:
    """``(outputs, parked gate)``: ``function(*args)`` (a checkpointed layer's forward, no autograd) replayed from
    its graph, with its MLP gate on its way to host memory where the layer parks it (:mod:`.graph_stash`,
    else None); or ``(None, None)``: run it eagerly."""
    if not mode_allows(function, args[hidden_index]):
        return None, None
    device = args[hidden_index].device
    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    parks = _parks_gate(_layer_of(function))
    key, graph, tensors, spec = _lookup("forward", function, args, hidden_index, (autocast, parks))
    if graph is None:
        return None, None
    if graph == "capture":
        graph = _capture_forward(key, function, spec, tensors, args[hidden_index], autocast, parks)
        if graph is None:
            return None, None
    else:
        graph.load(tensors)
    if graph.gate is not None:
        graph.gate.slot.before_write()
    _replay(graph)
    outs = [None if o is None else o.clone() for o in graph.outputs]
    parked = graph_stash.ParkedGate(graph.gate) if graph.gate is not None else None
    return (outs[0] if graph.single else tuple(outs)), (parked if parked is not None and parked.parked else None)


def _capture_forward(key, function, spec, tensors, hidden, autocast, parks: bool):
    if _checked_params(key, function) is None:
        return None
    inputs = _static_inputs(tensors, hidden)
    call, call_args = _static_call(function, spec, [b for b, _ in inputs])
    made: dict = {}
    gate = graph_stash.slot_stash(id(_layer_of(function))) if parks else None

    def body(warm: bool) -> None:
        with _autocast(hidden.device, autocast), _casts(warm), active_stash(gate):
            outs, made["single"] = _outputs(call(*call_args))
        if gate is not None:
            gate.end_call()
        made["outputs"] = [None if o is None else _buffer(("out", i), o) for i, o in enumerate(outs)]
        for s, o in zip(made["outputs"], outs):
            if s is not None:
                s.copy_(o)

    graph = _try_capture(key, body, hidden.device)
    if graph is None:
        return None
    entry = _state.graphs[key] = _Graph(graph, inputs, outputs=made["outputs"], single=made["single"], gate=gate)
    return entry


# ----------------------------------------------------------------------------------------------- backward


def run_backward(function: Callable, args: list, hidden_index: int, needs_grad: list[bool], autocast: dict,
                 grad_outputs: tuple, gate: graph_stash.ParkedGate | None = None):
    """Gradients of a checkpointed layer's inputs (one per entry of ``args``, None where none is needed) from
    its graphed recompute and backward, with its parameters' gradients added to their ``.grad``; or None: run
    it eagerly. ``args`` holds the restored layer input at ``hidden_index``; ``autocast`` is the forward's;
    ``gate`` the MLP gate its forward replay parked, which the recompute then reads instead of computing."""
    if not mode_allows(function, args[hidden_index]):
        return None
    if any(n for i, n in enumerate(needs_grad) if i != hidden_index):
        return None  # other inputs needing gradients: rare, and not worth a graph
    live = [i for i, g in enumerate(grad_outputs) if g is not None]
    if len(live) != 1:
        return None
    state = (autocast["enabled"], autocast["dtype"])
    key, graph, tensors, spec = _lookup("backward", function, args, hidden_index,
                                        (state, needs_grad[hidden_index], tuple(live), gate is not None))
    if graph is None:
        return None
    grad = grad_outputs[live[0]]
    if graph == "capture":
        graph = _capture_backward(key, function, spec, tensors, args[hidden_index], needs_grad[hidden_index],
                                  autocast, live[0], grad, gate)
        if graph is None:
            return None
        if gate is not None:
            gate.refetch()
    else:
        graph.load(tensors)
        _load_grad(graph.grad_out, grad)
    if gate is not None:
        gate.wait()
    _replay(graph)
    graph.param_grads.hand_off()
    return [graph.grad_in if i == hidden_index else None for i in range(len(args))]


def _load_grad(static: torch.Tensor, grad: torch.Tensor) -> None:
    """Copy the upstream gradient in, unless it is already there: the gradient a graphed layer returns is the
    static buffer the graphed layer below reads."""
    if not (grad.data_ptr() == static.data_ptr() and grad.shape == static.shape and grad.stride() == static.stride()
            and grad.dtype == static.dtype):
        static.copy_(grad)


def _grad_buffers_for(grad: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static upstream-gradient and input-gradient buffers: the two of a pair, so the input gradient one layer
    returns is where the next layer down reads its upstream gradient (no copy between graphed layers)."""
    pair = [_buffer(("grad", j), grad) for j in (0, 1)]
    ours = next((j for j, b in enumerate(pair) if b.data_ptr() == grad.data_ptr()), 0)
    return pair[ours], _buffer(("grad", 1 - ours), hidden)


def _checked_params(key, function) -> list[nn.Parameter] | None:
    """The trainable parameters of the layer ``function`` calls, or None (logged) where it must stay eager."""
    try:
        return _check_layer(_layer_of(function))
    except _Ineligible as e:
        _note_eager(key, str(e))
        return None


def _capture_backward(key, function, spec, tensors, hidden, needs_hidden, autocast, live, grad, gate):
    params = _checked_params(key, function)
    if params is None:
        return None
    inputs = _static_inputs(tensors, hidden)
    statics = [b for b, _ in inputs]
    leaf = statics[next(i for i, t in enumerate(tensors) if t is hidden)].detach().requires_grad_(needs_hidden)
    call, call_args = _static_call(function, spec, [leaf if t is hidden else b for t, b in zip(tensors, statics)])
    grad_out, grad_in = _grad_buffers_for(grad, hidden)
    _load_grad(grad_out, grad)
    param_grads = _ParamGrads(params)
    targets = ([leaf] if needs_hidden else []) + params
    device = hidden.device

    def body(warm: bool) -> None:
        with torch.enable_grad(), _autocast(device, (autocast["enabled"], autocast["dtype"])), \
                backward_recompute(), active_stash(gate.stash if gate is not None else None), _casts(warm), \
                dequant_handoff.recompute_to_backward() as handoff:
            outs, _ = _outputs(call(*call_args))
            handoff.collecting = False
            grads = torch.autograd.grad(outs[live], targets, grad_out, allow_unused=True)
        if needs_hidden:
            grad_in.copy_(grads[0]) if grads[0] is not None else grad_in.zero_()
        param_grads.write(list(grads[len(targets) - len(params):]))

    graph = _try_capture(key, body, device)
    if graph is None:
        return None
    entry = _state.graphs[key] = _Graph(graph, inputs, grad_out=grad_out, grad_in=grad_in if needs_hidden else None,
                                        param_grads=param_grads)
    return entry


def pool_bytes() -> int | None:
    """Device memory held by the graphs' shared pool (None where PyTorch's snapshot does not say)."""
    if _state.pool is None:
        return 0
    total, known = 0, False
    for segment in torch.cuda.memory_snapshot():
        pool = segment.get("segment_pool_id")
        if pool is None:
            continue
        known = True
        if tuple(pool) == tuple(_state.pool):
            total += segment["total_size"]
    return total if known else None
