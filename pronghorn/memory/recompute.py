"""Whether the code running now is a checkpointed layer being recomputed inside backward.

In that recompute only the tensors the layer's backward saves matter: the layer's output value is
never read (backward starts from the upstream gradient). A layer whose last op only feeds the
residual add (the MLP of Llama-style decoders) can skip computing that op's output there; for an
8B Llama that is the down-projection GEMM, about a quarter of a decoder layer's matmul FLOPs, in
every recompute. Only :mod:`pronghorn.memory.offload` opens this state, around its own recompute,
so torch's checkpoint (``mode="gpu"``) and plain forwards never see it.

A recompute that skips an op whose output *is* read later (the attention output projection, whose sum with
the residual feeds the next norm) takes that sum from :mod:`pronghorn.memory.stash` instead and joins it to
the recomputed graph with :func:`with_value`.
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["backward_recompute", "in_backward_recompute", "with_value"]

_state = threading.local()


@contextlib.contextmanager
def backward_recompute():
    """Mark the enclosed code as a layer recompute whose output value backward will not read."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def in_backward_recompute() -> bool:
    return getattr(_state, "active", False)


class _WithValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.dtype = graph.dtype
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


def with_value(graph: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value``, with gradients flowing to ``graph`` as if ``graph`` had been returned.

    For a recompute whose ``graph`` tensor was built from skipped (placeholder) ops: the saved ``value`` of
    the same shape stands in for it, so everything downstream computes on the exact forward value.
    """
    if graph.shape != value.shape:
        raise ValueError(f"with_value: the value's shape {tuple(value.shape)} differs from the graph tensor's "
                         f"{tuple(graph.shape)}")
    return _WithValue.apply(graph, value)
