"""Whether the code running now is a checkpointed layer being recomputed inside backward.

In that recompute only the tensors the layer's backward saves matter: the layer's output value is
never read (backward starts from the upstream gradient). A layer whose last op only feeds the
residual add (the MLP of Llama-style decoders) can skip computing that op's output there; for an
8B Llama that is the down-projection GEMM, about a quarter of a decoder layer's matmul FLOPs, in
every recompute. Only :mod:`pronghorn.memory.offload` opens this state, around its own recompute,
so torch's checkpoint (``mode="gpu"``) and plain forwards never see it.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["backward_recompute", "in_backward_recompute"]

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
