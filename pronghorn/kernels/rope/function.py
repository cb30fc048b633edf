"""RoPE as an autograd Function over the Triton kernel, and the public ``apply_rope`` entry point."""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import needs_int64, use_triton
from pronghorn.kernels.rope.reference import rope_reference


def _as_bhsd(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """A ``[B, H, S, D]`` view of ``t`` whatever the heads axis (1, or 2 for ``[B, S, H, D]``)."""
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


def _is_dense(t: torch.Tensor) -> bool:
    """True when every element of ``t`` has its own memory and together they fill one block."""
    expected = 1
    for size, stride in sorted((s, st) for st, s in zip(t.stride(), t.shape) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _writable_grads(dq: torch.Tensor, dk: torch.Tensor, q_like: tuple, k_like: tuple) -> bool:
    """Whether the incoming gradients may be overwritten with the input gradients."""
    for g, (shape, dtype) in ((dq, q_like), (dk, k_like)):
        if g.shape != shape or g.dtype != dtype or not _is_dense(g):
            return False
    (a0, a1), (b0, b1) = _span(dq), _span(dk)
    return a1 <= b0 or b1 <= a0


class RoPEFunction(torch.autograd.Function):
    r"""Rotary embedding of Q and K in one kernel launch, with a hand-written backward.

    For each pair of features ``(x1, x2)`` at one position the forward map is linear:

        [y1]   [ c1  -s1 ] [x1]
        [y2] = [ s2   c2 ] [x2]

    so the gradient is the transpose applied to the incoming gradient:

        dx1 = c1 * g1 + s2 * g2,    dx2 = c2 * g2 - s1 * g1

    which, with Hugging Face's ``c1 == c2``, ``s1 == s2``, is a rotation by ``-sin``. Features past
    ``rotary_dim`` are the identity in both directions. ``cos``/``sin`` get no gradient (Hugging Face
    builds them under ``no_grad``); ``apply_rope`` sends them to the reference when they need one.

    Autograd choices:

    * ``inplace=False`` (default): new output tensors, laid out like the inputs; the inputs are
      untouched, exactly like ``transformers``' ``apply_rotary_pos_emb``.
    * ``inplace=True``: the kernel writes into ``q`` and ``k`` and the Function calls
      ``ctx.mark_dirty(q, k)``; autograd bumps their version counters (so a stale save elsewhere is
      reported loudly) and rebases views correctly. Nothing is saved but ``cos``/``sin``, which the
      backward needs, so rotating in place never invalidates this Function's own backward.
    * ``inplace_backward=True``: the input gradients are written into the incoming gradient buffers
      when they are dense, of the right dtype, and do not overlap each other; otherwise new buffers.
      Correct only when nothing else reads those gradient tensors; that holds inside an attention
      layer, where they come fresh from the attention backward.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim, interleaved, inplace, inplace_backward):
        from pronghorn.kernels.rope.triton import rope_launch

        out_dtype_q = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
        out_dtype_k = torch.promote_types(torch.promote_types(k.dtype, cos.dtype), sin.dtype)
        if inplace:
            if out_dtype_q != q.dtype or out_dtype_k != k.dtype:
                raise ValueError(
                    f"apply_rope(inplace=True) needs cos/sin ({cos.dtype}, {sin.dtype}) no wider than q/k "
                    f"({q.dtype}, {k.dtype}): the result would be promoted and cannot be written back"
                )
            q_out, k_out = q, k
        else:
            q_out = torch.empty_like(q, dtype=out_dtype_q)
            k_out = torch.empty_like(k, dtype=out_dtype_k)
        int64 = needs_int64(q, k, q_out, k_out)
        rope_launch(
            _as_bhsd(q, unsqueeze_dim), _as_bhsd(k, unsqueeze_dim),
            _as_bhsd(q_out, unsqueeze_dim), _as_bhsd(k_out, unsqueeze_dim),
            cos, sin, backward=False, interleaved=interleaved, int64=int64,
        )
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim, ctx.interleaved, ctx.inplace_backward = unsqueeze_dim, interleaved, inplace_backward
        ctx.q_like = (q.shape, q.dtype)
        ctx.k_like = (k.shape, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        from pronghorn.kernels.rope.triton import rope_launch

        cos, sin = ctx.saved_tensors
        if ctx.inplace_backward and _writable_grads(dq_out, dk_out, ctx.q_like, ctx.k_like):
            dq, dk = dq_out, dk_out
        else:
            dq = torch.empty(ctx.q_like[0], dtype=ctx.q_like[1], device=dq_out.device)
            dk = torch.empty(ctx.k_like[0], dtype=ctx.k_like[1], device=dk_out.device)
        ud = ctx.unsqueeze_dim
        rope_launch(
            _as_bhsd(dq_out, ud), _as_bhsd(dk_out, ud), _as_bhsd(dq, ud), _as_bhsd(dk, ud),
            cos, sin, backward=True, interleaved=ctx.interleaved, int64=needs_int64(dq_out, dk_out, dq, dk),
        )
        return (
            dq if ctx.needs_input_grad[0] else None,
            dk if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None,
        )


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
        inplace: write the result into ``q`` and ``k`` (autograd-safe via ``mark_dirty``).
        inplace_backward: write the input gradients into the incoming gradient buffers where safe
            by layout; see :class:`RoPEFunction` for when that is correct.

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
    return RoPEFunction.apply(q, k, cos, sin, ud, interleaved, inplace, inplace_backward)
