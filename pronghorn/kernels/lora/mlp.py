"""Fused LoRA gated MLP, ``y = down(act(gate(x)) * up(x))``, with a hand-written backward.

The gate/up GEMMs write only their base outputs ``g``/``u``; their LoRA terms ``s (x A^T) B^T`` stay
factored and are added inside the activation kernels (:mod:`pronghorn.kernels.lora_gated`), which saves
a read and a write of each ``[N, I]`` output per pass. Below, ``g``/``u`` are the corrected values.

Saved for backward: ``x`` (only if a gate/up ``A`` trains), the base gate and up outputs (or Phi-3's
single ``[g | u]`` buffer), and the small ``[N, r]`` LoRA factors. ``h = act(g) * u`` is NOT
saved: where down's LoRA grads need it, the activation backward writes it in the same pass over ``g``/``u``,
into the buffer of ``dh``, which that pass reads before it writes.
A backward recompute (``output_unused``) does not make ``h`` at all: its only use there would be down's
``h A^T``, which backward then makes from its own ``h``. Over a quantized base inside a CUDA graph capture it
makes no ``g``/``u`` either: backward computes them chunk by chunk, one chunk's activations at a time
(:mod:`.mlp_chunked`), and a call that autograd does not record (a checkpointed layer's first pass) computes its
output the same way.
Saving ``g``/``u`` rather than recomputing them costs two ``[N, I]`` tensors but avoids re-running the
two large gate/up GEMMs; eager PEFT keeps four (``g``, ``act(g)``, ``u``, ``h``).

Backward, with ``dy`` upstream:

* ``dh = dy W_d + s_d (dy B_d) A_d``, plus ``dA_d``/``dB_d`` as in :mod:`.projection`; the GEMM writes
  ``dy W_d`` and the low-rank share stays factored until the activation backward adds it;
* ``dg = dh * u * act'(g)``, ``du = dh * act(g)``, written over ``g``/``u`` in place (so this graph can be
  walked backward once only);
* ``dx`` and the gate/up LoRA grads from ``dg``/``du`` as for any shared-input projection.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import cast_cache, mlp_chunked
from ..lora_gated.reference import LowRank
from .activation import NO_LOW_RANK, check_activation, gated_backward_, gated_forward
from .parts import as_parts
from .projection import (
    PER_PROJ, backward_shared, cast_to, compute_dtype, factor_grads, flat_parts, forward_shared, grads_out,
    input_grad, lora_inputs, project, unflat_parts, unread_output,
)


class LoraMLPFunction(torch.autograd.Function):
    """Gated MLP of LoRA projections (separate gate/up, or one fused gate_up). See the module docstring."""

    @staticmethod
    def forward(ctx, x, activation, fused_gate_up, output_unused, stash, scales, *flat):
        parts = unflat_parts(flat, scales)
        in_parts, down = parts[:-1], parts[-1]
        dtype = compute_dtype(x)
        x2 = cast_to(x.reshape(-1, x.shape[-1]), dtype)
        xas = lora_inputs(x2, in_parts, dtype)
        taken = stash.outputs if stash is not None and stash.outputs is not None else [None] * len(in_parts)
        # A recompute may leave the gate/up outputs to the chunked backward (see mlp_chunked).
        deferred = output_unused and all(t is None for t in taken) and mlp_chunked.applies(in_parts)
        # Outputs taken from this layer's forward (pronghorn.memory.stash) are not computed again.
        to_compute = [] if deferred else [p for p, t in zip(in_parts, taken) if t is None]
        into = [stash.into] + [None] * (len(to_compute) - 1) if stash is not None and stash.into is not None else None
        computed = iter(project(x2, to_compute, [None] * len(to_compute), dtype, into))  # base outputs only
        outs = [t if t is not None or deferred else next(computed) for t in taken]
        if stash is not None and stash.sink is not None:
            stash.sink(outs)
        y = ha = None
        if not output_unused:
            # In a backward recompute (output_unused) neither h nor down's h A^T is made here: the output is
            # never read, and backward makes h for down's LoRA grads anyway, so it makes h A^T from that.
            g, u = _split(outs, fused_gate_up)
            h = gated_forward(g, u, activation, _low_ranks(in_parts, xas, fused_gate_up, dtype))
            (y,), (ha,) = forward_shared(h, [down], dtype)
            del h
        needs = ctx.needs_input_grad[6:]  # after x, activation, fused_gate_up, output_unused, stash, scales
        need_a = [needs[i * PER_PROJ + 1] for i in range(len(parts))]
        need_b = [needs[i * PER_PROJ + 2] for i in range(len(parts))]
        n_in = len(in_parts)
        ctx.dtype, ctx.x_dtype, ctx.scales, ctx.activation = dtype, x.dtype, scales, activation
        ctx.fused, ctx.n_in, ctx.need_a, ctx.need_b, ctx.done = fused_gate_up, n_in, need_a, need_b, False
        ctx.weights, ctx.deferred = [p.weight for p in parts], deferred
        saved = [x2 if deferred or any(need_a[:n_in]) else None, *outs]
        saved += xas  # the activation adds the gate/up LoRA terms again in backward
        saved += [ha if need_b[-1] else None]
        saved += [t for p in parts for t in (p.A, p.B)]
        ctx.save_for_backward(*saved)
        if y is None:
            return unread_output(x, x.shape, dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.done:
            raise RuntimeError("lora_mlp writes its gradients over its saved gate/up outputs, so its graph can be "
                               "walked backward only once (retain_graph=True cannot reuse it)")
        ctx.done = True
        n_in, dtype = ctx.n_in, ctx.dtype
        saved = ctx.saved_tensors
        x2, outs = saved[0], list(saved[1:1 + n_in])
        xas, ha = saved[1 + n_in:1 + 2 * n_in], saved[1 + 2 * n_in]
        ab = saved[2 + 2 * n_in:]
        parts = [as_parts((ctx.weights[i], ab[2 * i], ab[2 * i + 1], ctx.scales[i])) for i in range(n_in + 1)]
        in_parts, down = parts[:-1], parts[-1]
        need_a, need_b = ctx.need_a, ctx.need_b
        dy2 = cast_to(dy.reshape(-1, dy.shape[-1]), dtype)
        if ctx.deferred:
            dx, d_as, d_bs = mlp_chunked.chunked_backward(x2, xas, in_parts, down, dy2, ctx.activation, ctx.fused,
                                                         dtype, ctx.needs_input_grad[0], need_a, need_b)
            return _returned(ctx, dx, dy, parts, d_as, d_bs)
        g, u = _split(outs, ctx.fused)
        low = _low_ranks(in_parts, xas, ctx.fused, dtype)

        need_in = ctx.needs_input_grad[0] or any(need_a[:-1]) or any(need_b[:-1])
        make_ha = need_b[-1] and ha is None  # forward was a recompute that left h A^T to here
        need_h = need_a[-1] or make_ha
        # down's factor t = s dy B_d: for its dA, and for its share of dh, which the activation backward adds
        # tile by tile (dh itself holds dy W_d only).
        t_down = {}
        a_down = cast_cache.cast(down.A, dtype) if down.A is not None else None
        if a_down is not None and (need_in or need_a[-1]):
            t_down = factor_grads(None, [None], [down], [dy2], dtype, True, [False], [False])[2]
        if need_in:
            dh = input_grad([down], [dy2], {}, dtype)
            low_dh = LowRank(t_down[0], a_down.t(), 1.0) if t_down else None
            # g, u now hold dL/dg, dL/du; h comes out of the same pass (the forward did not keep it), written
            # over dh, which that pass reads first: one [N, I] tensor less at the MLP's peak
            _, _, h = gated_backward_(dh, g, u, ctx.activation, low, low_dh, h_out=dh if need_h else None)
            del dh
        else:
            h = gated_forward(g, u, ctx.activation, low) if need_h else None
        if make_ha:
            ha = h @ a_down.t()
        d_as_down, d_bs_down, _ = factor_grads(h, [ha], [down], [dy2], dtype, False, [need_a[-1]], [need_b[-1]],
                                               ts=t_down)
        del h  # before gate/up's input gradient dequantizes their weights

        dx, d_as, d_bs = None, [None] * n_in, [None] * n_in
        if need_in:
            dx, d_as, d_bs = backward_shared(x2, xas, in_parts, outs, dtype, ctx.needs_input_grad[0],
                                             need_a[:-1], need_b[:-1])
        return _returned(ctx, dx, dy, parts, d_as + d_as_down, d_bs + d_bs_down)


def _returned(ctx, dx, dy, parts, d_as, d_bs) -> tuple:
    """The Function's gradients: ``dx`` in the input's dtype and shape, then one gradient per forward argument."""
    if dx is not None:
        dx = cast_to(dx, ctx.x_dtype).view(*dy.shape[:-1], dx.shape[-1])
    return (dx, None, None, None, None, None, *grads_out(parts, d_as, d_bs))


def _split(outs, fused):
    if fused:
        gu = outs[0]
        half = gu.shape[-1] // 2
        return gu[:, :half], gu[:, half:]
    return outs[0], outs[1]


def _low_ranks(in_parts, xas, fused, dtype) -> tuple[LowRank | None, LowRank | None]:
    """The gate's and the up's LoRA terms, factored (None for a projection without an adapter)."""
    if fused:
        part, xa = in_parts[0], xas[0]
        if xa is None:
            return NO_LOW_RANK
        b = cast_cache.cast(part.B, dtype)
        half = b.shape[0] // 2
        return LowRank(xa, b[:half], part.scale), LowRank(xa, b[half:], part.scale)
    return tuple(None if xa is None else LowRank(xa, cast_cache.cast(p.B, dtype), p.scale)
                 for p, xa in zip(in_parts, xas))


class GateUpStash(NamedTuple):
    """Gate/up outputs handed between a layer's forward and its backward recompute: ``sink`` receives them in
    forward; ``outputs`` replaces computing them in the recompute, one entry per gate/up projection, None
    for one to compute (either may be None); ``into(shape, dtype, device)`` gives the buffer the forward writes
    the first output (the gate) in (None: a new tensor), so the sink need not copy it."""

    outputs: list | None = None
    sink: Callable[[list], None] | None = None
    into: Callable[[tuple, torch.dtype, torch.device], torch.Tensor | None] | None = None


def lora_mlp(x: torch.Tensor, gate, up, down, activation: str = "swiglu", *,
             fused_gate_up: bool = False, output_unused: bool = False,
             stash: GateUpStash | None = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` for a gated MLP whose projections may carry LoRA adapters.

    Args:
        x: hidden states ``[..., hidden]``.
        gate, up, down: LoraParts ``(weight, A, B, scale, bias)`` (or such tuples) of gate_proj, up_proj,
            down_proj; A/B None for a projection without an adapter; weights may be bitsandbytes 4-bit.
        activation: "swiglu" (SiLU: Llama, Mistral, Qwen, Phi-3), "geglu_tanh" (Gemma's
            gelu_pytorch_tanh) or "geglu_exact" (erf GELU).
        fused_gate_up: Phi-3's ``gate_up_proj``: ``gate`` is the one projection producing ``[gate | up]``
            (gate first) and ``up`` must be None.
        output_unused: the caller will not read the output's value, only backpropagate through it (a
            checkpointed layer recomputed in backward, see :mod:`pronghorn.memory.recompute`): the
            down projection's GEMM is skipped and zeros of the output's shape are returned. The
            gradients are those of the normal path.
        stash: gate/up outputs to hand to, or take from, a later recompute (see :class:`GateUpStash`); the
            outputs taken must be exactly what this call would compute (same input and weights).

    The backward overwrites the saved gate/up outputs, so the graph supports a single backward pass.
    """
    check_activation(activation)
    if fused_gate_up:
        if up is not None:
            raise ValueError("fused_gate_up=True takes the fused gate_up projection as `gate`; pass up=None")
        parts = [as_parts(gate), as_parts(down)]
        width = parts[0].B.shape[0] if parts[0].B is not None else None
        if width is not None and width % 2:
            raise ValueError(f"fused gate_up projection must output an even width, its B has {width} rows")
    else:
        if up is None:
            raise ValueError("up is None: pass the up projection, or fused_gate_up=True for Phi-3's gate_up_proj")
        parts = [as_parts(gate), as_parts(up), as_parts(down)]
    # applies() first: it is False for every eager call by default, which then skips _recorded's walk of the parts
    if not output_unused and stash is None and mlp_chunked.applies(parts[:-1]) and not _recorded(x, parts):
        return _chunked_forward(x, parts, activation, bool(fused_gate_up))
    return LoraMLPFunction.apply(x, activation, bool(fused_gate_up), bool(output_unused), stash,
                                 tuple(float(p.scale) for p in parts),
                                 *flat_parts(parts))


def _recorded(x: torch.Tensor, parts) -> bool:
    """Whether autograd would record a call on ``x`` and these parts."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (x, *flat_parts(parts)))


def _chunked_forward(x, parts, activation, fused) -> torch.Tensor:
    """The MLP's output computed a chunk of the intermediate dimension at a time (no autograd records it)."""
    dtype = compute_dtype(x)
    x2 = cast_to(x.reshape(-1, x.shape[-1]), dtype)
    in_parts = parts[:-1]
    y = mlp_chunked.chunked_forward(x2, lora_inputs(x2, in_parts, dtype), in_parts, parts[-1], activation, fused,
                                    dtype)
    return y.view(*x.shape[:-1], y.shape[-1])
