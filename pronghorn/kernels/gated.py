"""What the gated activations of a gated MLP (SwiGLU, GeGLU: ``h = act(gate) * up``) share: input
checks, row views, the test for when gradients may be written over the saved inputs, and the one
autograd Function that runs any op's Triton kernel pair.

Each op keeps its own ``kernels/<op>/`` folder: the Triton kernels (``triton.py``), a subclass of
:class:`GatedActivationFunction` that names the op and carries its derivation (``function.py``),
and the PyTorch reference (``reference.py``). Nothing here imports Triton, so this module loads
where Triton is missing; the kernel pair is handed in by the op once Triton is known to run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, last_dim] view of ``t`` with unit column stride (copies only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < t2.shape[1]):
        t2 = t2.contiguous()
    return t2


def _span(t2: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) that the rows view ``t2`` touches."""
    start = t2.data_ptr()
    last = (t2.shape[0] - 1) * t2.stride(0) + t2.shape[1]
    return start, start + last * t2.element_size()


def _is_view_of(t2: torch.Tensor, t: torch.Tensor) -> bool:
    return t2.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() and t2.data_ptr() == t.data_ptr()


def _disjoint(a2: torch.Tensor, b2: torch.Tensor) -> bool:
    """Whether two rows views share no element. Handles the common interleaved case, two
    column halves of one [rows, 2*I] buffer (Phi-3's fused gate_up), exactly; otherwise any
    overlap of the byte ranges counts as shared."""
    (a0, a1), (b0, b1) = _span(a2), _span(b2)
    if a1 <= b0 or b1 <= a0:
        return True
    width, stride = a2.shape[1], a2.stride(0)
    if b2.shape == a2.shape and b2.stride() == a2.stride() and a2.element_size() == b2.element_size():
        shift = ((b0 - a0) // a2.element_size()) % stride
        return (b0 - a0) % a2.element_size() == 0 and shift >= width and stride - shift >= width
    return False


def can_overwrite(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may write gradients over these saved inputs.

    True only for non-leaf tensors (a leaf is user data or a parameter) whose rows view is the
    tensor's own memory, without internal overlap, and which share no element with each other.
    The caller still promises that no other autograd node saved these tensors.
    """
    views = []
    for t in tensors:
        if t.is_leaf or t.numel() == 0:
            return False
        t2 = as_rows(t)
        if not _is_view_of(t2, t) or (t2.shape[0] > 1 and t2.stride(0) < t2.shape[1]):
            return False
        views.append(t2)
    return all(_disjoint(a, b) for i, a in enumerate(views) for b in views[i + 1:])


def check_pair(gate: torch.Tensor, up: torch.Tensor, name: str) -> None:
    """Raise unless ``gate`` and ``up`` agree in shape, dtype and device and are not 0-d; ``name`` is the op."""
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"{name}: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"{name}: gate and up are on different devices ({gate.device} and {up.device})")
    if gate.dim() == 0:
        raise ValueError(f"{name}: gate and up must have at least one dimension")


@dataclass(frozen=True)
class GatedKernels:
    """The Triton launch pair of one gated activation, on 2-D row views with unit column stride.

    Attributes:
        name: the public op name, used in error messages (``"swiglu"``, ``"geglu"``).
        forward: ``forward(g, u) -> h``, a new contiguous ``h = act(g) * u``.
        backward: ``backward(dh, g, u, dg, du)`` writes ``dL/dg`` into ``dg`` and ``dL/du`` into
            ``du``; ``dg``/``du`` may be ``g``/``u`` themselves (every element is read before written).
    """

    name: str
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    backward: Callable[..., None]


class GatedActivationFunction(torch.autograd.Function):
    """``h = act(g) * u`` through a :class:`GatedKernels` pair, with ``dL/du = dh * act(g)`` and
    ``dL/dg = dh * u * act'(g)`` (each op's subclass gives ``act'``).

    Only ``g`` and ``u`` are saved; ``act(g)`` is recomputed in backward (cheaper in memory than
    saving it, and the kernels are bandwidth-bound anyway). With ``inplace_backward`` the two
    gradients are written over the saved ``g``/``u`` buffers, so backward allocates nothing; such a
    graph can be walked backward only once. Ops subclass this (``SwiGLUFunction``, ``GeGLUFunction``)
    so autograd graphs and profiles name the op.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kernels: GatedKernels, inplace_backward: bool):
        h = kernels.forward(as_rows(gate), as_rows(up)).view(gate.shape)
        ctx.save_for_backward(gate, up)
        ctx.kernels = kernels
        ctx.inplace = bool(inplace_backward) and can_overwrite(gate, up)
        ctx.done = False
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        if ctx.inplace and ctx.done:
            raise RuntimeError(f"{ctx.kernels.name}(inplace_backward=True) wrote its gradients over its saved "
                               "inputs, so it cannot run backward twice; call it with inplace_backward=False "
                               "to keep the graph")
        ctx.done = True
        gate, up = ctx.saved_tensors
        g2, u2 = as_rows(gate), as_rows(up)
        if ctx.inplace:
            ctx.kernels.backward(as_rows(dh), g2, u2, g2, u2)
            dgate, dup = gate, up
        else:
            dg = torch.empty_like(g2, memory_format=torch.contiguous_format)
            du = torch.empty_like(u2, memory_format=torch.contiguous_format)
            ctx.kernels.backward(as_rows(dh), g2, u2, dg, du)
            dgate, dup = dg.view(gate.shape), du.view(up.shape)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None), None, None
