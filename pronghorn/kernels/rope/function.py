"""RoPE as an autograd Function over the Triton kernel, and the public ``apply_rope`` entry point."""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import offsets_need_int64, use_triton
from pronghorn.kernels.rope.reference import rope_reference


def _as_bhsd(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """A ``[B, H, S, D]`` view of ``t`` whatever the heads axis (1, or 2 for ``[B, S, H, D]``)."""
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


def _is_dense(t: torch.Tensor) -> bool:
    """True when every element of ``t`` has its own memory and together they fill one block."""
    expected = 1
    for stride, size in sorted((st, s) for st, s in zip(t.stride(), t.shape) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _like(t: torch.Tensor) -> tuple:
    """What backward needs to allocate ``t``'s gradient laid out as ``t`` is: shape, dtype, and strides when
    ``t`` is dense (q/k are usually transposed views of a projection output; a gradient in that layout
    flows back into the projection's backward without a copy)."""
    return t.shape, t.dtype, (t.stride() if _is_dense(t) else None)


def _empty_like(like: tuple, device) -> torch.Tensor:
    shape, dtype, stride = like
    if stride is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _writable_grads(dq: torch.Tensor, dk: torch.Tensor, q_like: tuple, k_like: tuple) -> bool:
    """Whether the incoming gradients may be overwritten with the input gradients."""
    for g, (shape, dtype, _) in ((dq, q_like), (dk, k_like)):
        if g.shape != shape or g.dtype != dtype or not _is_dense(g):
            return False
    (a0, a1), (b0, b1) = _span(dq), _span(dk)
    return a1 <= b0 or b1 <= a0


def _out_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    """The dtype Hugging Face's ``x * cos + rotate_half(x) * sin`` produces."""
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


class RoPEFunction(torch.autograd.Function):
    r"""Rotary embedding of Q and K in one kernel launch, into new tensors, with a hand-written backward.

    For each pair of features ``(x1, x2)`` at one position the forward map is linear:

        [y1]   [ c1  -s1 ] [x1]
        [y2] = [ s2   c2 ] [x2]

    so the gradient is the transpose applied to the incoming gradient:

        dx1 = c1 * g1 + s2 * g2,    dx2 = c2 * g2 - s1 * g1

    which, with Hugging Face's ``c1 == c2``, ``s1 == s2``, is a rotation by ``-sin``. Features past
    ``rotary_dim`` are the identity in both directions. ``cos``/``sin`` get no gradient (Hugging Face
    builds them under ``no_grad``); ``apply_rope`` sends them to the reference when they need one.

    The outputs are new tensors laid out like the inputs, which stay untouched, exactly as with
    ``transformers``' ``apply_rotary_pos_emb``; only ``cos``/``sin`` are saved. With
    ``inplace_backward`` the input gradients are written into the incoming gradient buffers when
    those are dense, of the inputs' dtype, and do not overlap each other; otherwise into new
    buffers. That is correct only when nothing else reads those gradient tensors, which holds inside
    an attention layer, where they come fresh from the attention backward.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim, interleaved, inplace_backward):
        from pronghorn.kernels.rope.triton import rope_launch

        q_out = torch.empty_like(q, dtype=_out_dtype(q, cos, sin))
        k_out = torch.empty_like(k, dtype=_out_dtype(k, cos, sin))
        rope_launch(
            _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim),
            _as_bhsd(q_out, unsqueeze_dim), _as_bhsd(k_out, unsqueeze_dim),
            cos, sin, backward=False, interleaved=interleaved, int64=offsets_need_int64(q, k, q_out, k_out),
        )
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim, ctx.interleaved, ctx.inplace_backward = unsqueeze_dim, interleaved, inplace_backward
        ctx.q_like, ctx.k_like = _like(q), _like(k)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        from pronghorn.kernels.rope.triton import rope_launch

        cos, sin = ctx.saved_tensors
        if ctx.inplace_backward and _writable_grads(dq_out, dk_out, ctx.q_like, ctx.k_like):
            dq, dk = dq_out, dk_out
        else:
            dq, dk = _empty_like(ctx.q_like, dq_out.device), _empty_like(ctx.k_like, dk_out.device)
        ud = ctx.unsqueeze_dim
        rope_launch(
            _as_bhsd(dq_out, ud), _as_bhsd(dk_out, ud), _as_bhsd(dq, ud), _as_bhsd(dk, ud),
            cos, sin, backward=True, interleaved=ctx.interleaved, int64=offsets_need_int64(dq_out, dk_out, dq, dk),
        )
        return (
            dq if ctx.needs_input_grad[0] else None,
            dk if ctx.needs_input_grad[1] else None,
            None, None, None, None, None,
        )


class RoPEInplaceFunction(torch.autograd.Function):
    """Rotary embedding of one tensor in place, for use under autograd (same maths as :class:`RoPEFunction`).

    The kernel overwrites ``x`` and the Function calls ``ctx.mark_dirty(x)``, so autograd bumps the
    version counter (a stale save elsewhere is reported loudly) and rebases views onto their base.
    Autograd supports that for a view input only when the Function has a single output, which is why
    Q and K go through one call each here rather than one launch together. The backward rotates the
    incoming gradient by ``-sin`` into a new buffer. Only ``cos``/``sin`` are saved, so overwriting
    ``x`` never invalidates this Function's own backward.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, unsqueeze_dim, interleaved):
        from pronghorn.kernels.rope.triton import rope_launch

        xv = _as_bhsd(x, unsqueeze_dim)
        rope_launch(xv, None, xv, None, cos, sin, backward=False, interleaved=interleaved, int64=offsets_need_int64(x))
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim, ctx.interleaved = unsqueeze_dim, interleaved
        return x

    @staticmethod
    def backward(ctx, dy):
        from pronghorn.kernels.rope.triton import rope_launch

        cos, sin = ctx.saved_tensors
        dx = torch.empty_like(dy)
        ud = ctx.unsqueeze_dim
        rope_launch(
            _as_bhsd(dy, ud), None, _as_bhsd(dx, ud), None, cos, sin,
            backward=True, interleaved=ctx.interleaved, int64=offsets_need_int64(dy, dx),
        )
        return dx, None, None, None, None


def _rope_inplace(q, k, cos, sin, unsqueeze_dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from pronghorn.kernels.rope.triton import rope_launch

    for x in (q, k):
        if _out_dtype(x, cos, sin) != x.dtype:
            raise ValueError(
                f"apply_rope(inplace=True) needs cos/sin ({cos.dtype}, {sin.dtype}) no wider than q/k "
                f"({q.dtype}, {k.dtype}): the result would be promoted and cannot be written back"
            )
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return (
            RoPEInplaceFunction.apply(q, cos, sin, unsqueeze_dim, interleaved),
            RoPEInplaceFunction.apply(k, cos, sin, unsqueeze_dim, interleaved),
        )
    # Nothing records this (inference): one launch rotates both tensors where they lie.
    qv, kv = _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim)
    rope_launch(qv, kv, qv, kv, cos, sin, backward=False, interleaved=interleaved, int64=offsets_need_int64(q, k))
    return q, k


def _kernel_can_take(q, k, cos, sin, unsqueeze_dim: int) -> bool:
    """Shapes the kernel handles; anything else goes to the reference, which broadcasts like HF."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or unsqueeze_dim not in (1, 2):
        return False
    qv, kv = _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim)
    batch, _, seq, head_dim = qv.shape
    rot = cos.shape[-1]
    return (
        kv.shape[0] == batch and kv.shape[2] == seq and kv.shape[3] == head_dim
        and cos.shape[0] in (1, batch) and cos.shape[1] == seq
        and rot % 2 == 0 and 0 < rot <= head_dim
    )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    *,
    interleaved: bool = False,
    inplace: bool = False,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of ``q`` and ``k``, same semantics as ``transformers``' ``apply_rotary_pos_emb``.

    Args:
        q: ``[batch, q_heads, seq, head_dim]`` (``[batch, seq, q_heads, head_dim]`` with ``unsqueeze_dim=2``);
            any strides, e.g. the transposed view of a projection output.
        k: the same layout with ``kv_heads`` heads.
        cos, sin: ``[batch or 1, seq, rotary_dim]`` as a Hugging Face rotary-embedding module returns
            them (scaling variants and ``position_ids`` already applied). ``rotary_dim < head_dim``
            rotates only the first ``rotary_dim`` features (partial rotary).
        unsqueeze_dim: 1 or 2, the heads axis of q/k (as in transformers).
        interleaved: pair features ``(2j, 2j+1)`` instead of ``(j, j + rotary_dim/2)``.
        inplace: write the result into ``q`` and ``k``. Without autograd recording (inference) one
            launch rotates both; under autograd each goes through :class:`RoPEInplaceFunction`
            (``mark_dirty``), which is exact. Requires cos/sin no wider than q/k's dtype.
        inplace_backward: (``inplace=False`` only) write the input gradients into the incoming
            gradient buffers where safe by layout; see :class:`RoPEFunction` for when that is correct.

    Returns:
        ``(q_rotated, k_rotated)``; with ``inplace=True`` these are ``q`` and ``k`` themselves.
    """
    if q is k:
        raise ValueError("apply_rope: q and k are the same tensor; pass distinct tensors")
    ud = unsqueeze_dim + 4 if unsqueeze_dim < 0 else unsqueeze_dim
    triton_ok = (
        use_triton(q, k, cos, sin)
        and not (cos.requires_grad or sin.requires_grad)
        and q.numel() > 0 and k.numel() > 0
        and _kernel_can_take(q, k, cos, sin, ud)
    )
    if not triton_ok:
        q_rot, k_rot = rope_reference(q, k, cos, sin, unsqueeze_dim, interleaved)
        if inplace:
            # copy_ is recorded by autograd like the kernel's mark_dirty path.
            q.copy_(q_rot)
            k.copy_(k_rot)
            return q, k
        return q_rot, k_rot
    if inplace:
        return _rope_inplace(q, k, cos, sin, ud, interleaved)
    return RoPEFunction.apply(q, k, cos, sin, ud, interleaved, inplace_backward)
