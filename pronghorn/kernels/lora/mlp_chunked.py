"""A LoRA gated MLP in chunks of the intermediate dimension: one chunk's activations at a time.

Run at full width, a layer's MLP holds ``g``, ``u`` and ``h`` (and in backward ``dh = dy W_d``) as
``[tokens, intermediate]`` tensors: 470 MB for an 8B Llama at 2 x 2048 tokens, plus a dequantized weight of a
4-bit base. Here the intermediate dimension is walked in chunks of ``c`` rows, and each 4-bit weight is
dequantized once, a part at a time, into a buffer every chunk reuses (a float base is read through views):

* **Forward without autograd** (a checkpointed layer's first pass, :func:`chunked_forward`): for each chunk it
  makes the chunk's ``[g | u]`` (one GEMM over stacked gate and up rows), ``h = act(g) * u``, and adds
  ``h W_d^T`` and down's ``h A_d^T`` to float32 sums.
* **Backward of a recompute** (:func:`chunked_backward`): the recompute makes only the small ``x A^T`` factors
  (see ``LoraMLPFunction``). For each chunk backward makes ``[g | u]`` again and ``dh`` from down's columns,
  runs the activation backward (``dg``/``du`` over ``g``/``u``, ``h`` over ``dh``), takes the chunk's rows of
  gate/up ``dB`` and down ``dA^T``, its share of the ``[tokens, r]`` sums ``t = s d[g|u] B`` and ``h A_d^T``
  (float32), and accumulates ``dx += dg W_g + du W_u``.

The MLP's working set is then one chunk (about 130 MB with 32 MiB chunks). The chunks cost the host several
times the launches of the full-width path, so by default they run only inside CUDA graphs, whose replays launch
nothing from Python and whose memory pool then holds one chunk, and only over quantized bases (see
:func:`set_chunked_mlp`).
"""
from __future__ import annotations

import os

import torch

from ..dequant.weights import dense_part, is_quantized, weight_rows
from ..lora_gated.reference import LowRank
from . import cast_cache
from .activation import gated_backward_, gated_forward
from .projection import _cat_factors, _scaled, cast_to, factor_grads, wide_result

# Bytes of a chunk's gate and up outputs; at 2 x 2048 tokens of an 8B Llama that is seven chunks of 2,048 rows.
CHUNK_BYTES = 32 * 2**20
# The forward's chunks may be larger: its working set is about half of backward's, and every chunk reads and
# writes the float32 output sum once more (at 2 x 2048 tokens of an 8B Llama, 128 MiB per chunk per layer).
FORWARD_CHUNK_BYTES = 64 * 2**20
MODES = ("capture", "always", "never")
ENV = "PRONGHORN_CHUNKED_MLP"


def _mode_from_env() -> str:
    mode = os.environ.get(ENV, "capture").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: must be one of {MODES} (unset means 'capture')")
    return mode


_config = {"mode": _mode_from_env()}


def set_chunked_mlp(mode: str) -> None:
    """When an MLP without gate/up biases runs chunked: its forward without autograd, and the backward of a recompute.

    ``"capture"`` (the default): while a CUDA graph is being captured (:mod:`pronghorn.memory.layer_graphs`), over
    a quantized (4- or 8-bit) base. The chunks cost the host several times the launches of the full-width path;
    replaying a graph costs none, and the graph's memory pool then holds one chunk instead of full-width
    activations. Run eagerly on an H100 whose host could not keep up, the chunked backward made the step slower
    (benchmarks/results/2026-11-22-mlp-chunked.md). Over a float base the chunks cost time even in a graph: graphed
    bf16 8B steps took 9 ms longer with the backward chunked and 16 ms with both passes, for a peak 0.11 and
    0.26 GiB lower (benchmarks/results/2026-11-23-graph-attention.md).
    ``"always"``, ``"never"``: regardless of capture (``"always"`` is how the CPU tests reach it). The environment
    variable ``PRONGHORN_CHUNKED_MLP`` sets the mode at import.
    """
    if mode not in MODES:
        raise ValueError(f"chunked MLP mode must be one of {MODES}, got {mode!r}")
    _config["mode"] = mode


def applies(in_parts) -> bool:
    """Whether an MLP with these gate/up parts runs chunked now (see :func:`set_chunked_mlp`)."""
    mode = _config["mode"]
    if mode == "never" or any(p.bias is not None for p in in_parts):
        return False
    weight = in_parts[0].weight
    return mode == "always" or (weight.is_cuda and torch.cuda.is_current_stream_capturing() and is_quantized(weight))


def chunk_rows(tokens: int, inter: int, element_size: int, budget: int | None = None) -> int:
    """Intermediate rows per chunk: as many as fit ``budget`` bytes (default :data:`CHUNK_BYTES`) of gate and up
    outputs, split evenly over the chunks needed."""
    fit = max(1, (budget or CHUNK_BYTES) // max(1, 2 * tokens * element_size))
    chunks = -(-inter // fit)
    return -(-inter // chunks)


def chunked_forward(x2, xas, in_parts, down, activation: str, fused: bool, dtype) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` ``[tokens, out]`` in ``dtype``, for a call that autograd does not record.

    Args as for :func:`chunked_backward`. Matches the full-width forward up to the order of float32 sums.
    """
    chunks = _Chunks(x2, in_parts, down, fused, dtype)
    a_down = cast_cache.cast(down.A, dtype) if down.A is not None else None
    y = ha = None
    for j0, j1 in chunks.ranges(FORWARD_CHUNK_BYTES):
        spans = chunks.spans(j0, j1)
        outs, _ = chunks.gate_up(spans)
        h = gated_forward(outs[0], outs[1], activation, chunks.low_ranks(xas, spans))
        y = _accumulate_mm(y, h, chunks.down_columns(j0, j1).t())
        if a_down is not None:
            ha = _accumulate_mm(ha, h, a_down.t()[j0:j1])
        del h, outs
    y = y.to(dtype)
    if down.bias is not None:
        y += cast_to(down.bias, dtype)
    if ha is not None:
        y.addmm_(ha.to(dtype), cast_cache.cast(down.B, dtype).t(), alpha=down.scale)
    return y


def chunked_backward(x2, xas, in_parts, down, dy2, activation: str, fused: bool, dtype, need_dx: bool,
                     need_a: list, need_b: list):
    """``(dx, [dA], [dB])`` of a gated LoRA MLP whose forward kept only ``x2`` and the gate/up ``x A^T``.

    Args:
        x2: the MLP input ``[tokens, hidden]`` in ``dtype``; xas: each gate/up part's ``x A^T`` (None without LoRA).
        in_parts: gate and up (or Phi-3's one gate_up) LoraParts; down: down's.
        dy2: the upstream gradient ``[tokens, hidden]`` in ``dtype``.
        need_dx: whether the input gradient is wanted; need_a, need_b: per part (gate/up first, down last).
    Returns dA/dB in each parameter's dtype, per part in the order of ``[*in_parts, down]``.
    """
    run = _ChunkedRun(x2, xas, in_parts, down, dy2, activation, fused, dtype, need_dx, need_a, need_b)
    if run.need_upstream or run.need_h:
        for j0, j1 in run.chunks.ranges():
            run.chunk(j0, j1)
    return run.finish()


class _Chunks:
    """Chunks of one MLP's weights: gate/up rows and down columns, 4-bit ones dequantized into reused buffers."""

    def __init__(self, x2, in_parts, down, fused, dtype):
        self.x2, self.in_parts, self.down, self.dtype = x2, in_parts, down, dtype
        self.inter = weight_rows(in_parts[0].weight) // (2 if fused else 1)
        # each of gate and up: (its part, the row where its rows start in that part's weight)
        self.segments = ((0, 0), (0, self.inter)) if fused else ((0, 0), (1, 0))
        self.stacked = any(is_quantized(p.weight) or p.weight.dtype != dtype for p in in_parts)
        self.bs = [cast_cache.cast(p.B, dtype) if p.B is not None else None for p in in_parts]
        self.buffers = {}

    def ranges(self, budget: int | None = None):
        """``(j0, j1)`` of each chunk of the intermediate dimension (see :func:`chunk_rows`)."""
        rows = chunk_rows(self.x2.shape[0], self.inter, self.x2.element_size(), budget)
        return [(j0, min(j0 + rows, self.inter)) for j0 in range(0, self.inter, rows)]

    def spans(self, j0: int, j1: int) -> list:
        """The chunk's ``(part index, weight rows)`` of gate, then of up."""
        return [(i, slice(off + j0, off + j1)) for i, off in self.segments]

    def buffer(self, name, shape):
        """A buffer reused by every chunk: its first ``shape`` elements (the last chunk may be shorter)."""
        numel = shape[0] * shape[1]
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = self.x2.new_empty(numel)
        return buf[:numel].view(shape)

    def gate_up(self, spans):
        """The chunk's gate and up outputs, and the (output, weight rows) pairs whose products make its ``dx``."""
        c, hidden = spans[0][1].stop - spans[0][1].start, self.x2.shape[1]
        if self.stacked:
            w = self.buffer("gate_up", (2 * c, hidden))
            for k, (i, span) in enumerate(spans):
                dense_part(self.in_parts[i].weight, self.dtype, span, out=w[k * c:(k + 1) * c])
            gu = self.x2 @ w.t()
            return [gu[:, :c], gu[:, c:]], [(gu, w)]
        ws = [self.in_parts[i].weight[span] for i, span in spans]
        outs = [self.x2 @ w.t() for w in ws]
        return outs, list(zip(outs, ws))

    def low_ranks(self, xas, spans) -> tuple:
        """The chunk's gate and up LoRA terms, factored (None for a part without an adapter)."""
        return tuple(LowRank(xas[i], self.bs[i][span], self.in_parts[i].scale) if xas[i] is not None else None
                     for i, span in spans)

    def down_columns(self, j0: int, j1: int) -> torch.Tensor:
        """Down's weight columns ``j0:j1``, ``[out, c]``."""
        weight = self.down.weight
        out = self.buffer("down", (weight_rows(weight), j1 - j0)) if is_quantized(weight) else None
        return dense_part(weight, self.dtype, slice(None), slice(j0, j1), out)


class _ChunkedRun:
    """The state of one chunked backward: what is wanted, the weight chunks, and the sums."""

    def __init__(self, x2, xas, in_parts, down, dy2, activation, fused, dtype, need_dx, need_a, need_b):
        n_in = len(in_parts)
        self.x2, self.xas, self.in_parts, self.down, self.dy2 = x2, xas, in_parts, down, dy2
        self.activation, self.dtype, self.need_dx, self.need_a, self.need_b = activation, dtype, need_dx, need_a, need_b
        self.chunks = _Chunks(x2, in_parts, down, fused, dtype)
        self.need_upstream = need_dx or any(need_a[:n_in]) or any(need_b[:n_in])
        self.need_h = need_a[-1] or need_b[-1]
        self.a_down = cast_cache.cast(down.A, dtype) if down.A is not None else None
        self.t_down = None  # s dy B_d: its dA, and its share of dh (added by the activation backward)
        if self.a_down is not None and (self.need_upstream or need_a[-1]):
            self.t_down = factor_grads(None, [None], [down], [dy2], dtype, True, [False], [False])[2][0]
        self.bs = self.chunks.bs
        self.xas_scaled = [_scaled(xa, p.scale) if xa is not None else None for p, xa in zip(in_parts, xas)]
        self.want_t = [p.A is not None and (need_dx or need_a[i]) for i, p in enumerate(in_parts)]
        self.t_sums, self.ha_sum, self.dx = [None] * n_in, None, None
        self.d_bs = [self._grad_like(p.B) if p.B is not None and need_b[i] else None for i, p in enumerate(in_parts)]
        # down's dA as [inter, r], written a chunk of rows at a time and transposed at the end
        self.d_a_down_t = self._grad_like(down.A.t()) if down.A is not None and need_a[-1] else None

    def _grad_like(self, param):
        return torch.empty(param.shape, dtype=param.dtype, device=self.x2.device)

    def chunk(self, j0: int, j1: int) -> None:
        spans = self.chunks.spans(j0, j1)
        outs, blocks = self.chunks.gate_up(spans)
        low = self.chunks.low_ranks(self.xas, spans)
        if self.need_upstream:
            w_down = self.chunks.down_columns(j0, j1)
            dh = self.dy2 @ w_down
            del w_down
            low_dh = LowRank(self.t_down, self.a_down.t()[j0:j1], 1.0) if self.t_down is not None else None
            gated_backward_(dh, outs[0], outs[1], self.activation, low, low_dh, h_out=dh if self.need_h else None)
            h = dh
            self._gate_up_grads(spans, outs, blocks)
        else:
            h = gated_forward(outs[0], outs[1], self.activation, low)
        if self.need_h:
            self._down_grads(h, j0, j1)

    def _gate_up_grads(self, spans, d_outs, blocks) -> None:
        """The chunk's gate/up dB rows, t sums and dx, from ``d_outs`` (dg, du, written over the outputs)."""
        for (i, span), d_out in zip(spans, d_outs):
            if self.d_bs[i] is not None:
                _mm_into(self.d_bs[i][span], d_out.t(), self.xas_scaled[i])
            if self.want_t[i]:
                self.t_sums[i] = _accumulate_mm(self.t_sums[i], d_out, self.bs[i][span])
        if self.need_dx:
            for d_out, w in blocks:
                self.dx = d_out @ w if self.dx is None else self.dx.addmm_(d_out, w)

    def _down_grads(self, h, j0: int, j1: int) -> None:
        if self.d_a_down_t is not None:
            _mm_into(self.d_a_down_t[j0:j1], h.t(), self.t_down)
        if self.need_b[-1]:
            self.ha_sum = _accumulate_mm(self.ha_sum, h, self.a_down.t()[j0:j1])

    def finish(self):
        n_in, dtype = len(self.in_parts), self.dtype
        ts = {i: (t * self.in_parts[i].scale).to(dtype) for i, t in enumerate(self.t_sums) if t is not None}
        d_as = factor_grads(self.x2, self.xas, self.in_parts, [None] * n_in, dtype, False, self.need_a[:n_in],
                            [False] * n_in, ts=ts)[0]
        if self.need_dx and ts:
            order = list(ts)
            a_cat = cast_cache.cat_rows([self.in_parts[i].A for i in order], dtype)
            self.dx.addmm_(_cat_factors(ts, order), a_cat)
        d_b_down = None
        if self.ha_sum is not None:
            ha = self.ha_sum.to(dtype)
            d_b_down = factor_grads(None, [ha], [self.down], [self.dy2], dtype, False, [False], [True])[1][0]
        d_a_down = self.d_a_down_t.t().contiguous() if self.d_a_down_t is not None else None
        return self.dx, d_as + [d_a_down], self.d_bs + [d_b_down]


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` in ``out``'s dtype (a LoRA grad's rows), one launch where the GEMM can write it."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif wide_result(a, out.dtype):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        out.copy_(a @ b)


def _accumulate_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in float32, accumulated in place (a new sum when ``acc`` is None)."""
    if wide_result(a, torch.float32):
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    product = a.float() @ b.float()
    return product if acc is None else acc.add_(product)
