"""Triton kernel for rotary position embedding: one launch rotates Q and K together.

One program owns one (batch, position) pair. It loads that position's cos/sin once and applies them
to every query head and every key head, so cos/sin are read once per position instead of once per
head. All tensors are addressed through their strides, so transposed or sliced views of the
projection outputs need no copy, and the output may be the input itself (in place).

For a pair ``(x1, x2)`` of features (``j`` and ``j + r/2``, or ``2j`` and ``2j + 1`` when interleaved)
the forward map is ``(x1*c1 - x2*s1, x2*c2 + x1*s2)`` with ``c1, s1`` read at the first feature and
``c2, s2`` at the second (equal in Hugging Face's layout, but not assumed). Its transpose, used by the
backward pass, is ``(g1*c1 + g2*s2, g2*c2 - g1*s1)``: a rotation by ``-sin``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pronghorn.kernels.compiled_launch import launch


@triton.jit
def _rotate_heads(
    X, XO, x_base, o_base, x_sh, x_sd, o_sh, o_sd, n_heads,
    d1, d2, pair_mask, c1, c2, s1, s2, pass_cols, pass_mask,
    BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr, INT64: tl.constexpr, BLOCK_H: tl.constexpr,
):
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        head_mask = h < n_heads
        if INT64:
            h = h.to(tl.int64)
        x_row = X + x_base + h[:, None] * x_sh
        o_row = XO + o_base + h[:, None] * o_sh
        m = head_mask[:, None] & pair_mask[None, :]
        x1 = tl.load(x_row + d1[None, :] * x_sd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + d2[None, :] * x_sd, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(o_row + d1[None, :] * o_sd, o1.to(XO.dtype.element_ty), mask=m)
        tl.store(o_row + d2[None, :] * o_sd, o2.to(XO.dtype.element_ty), mask=m)
        if COPY_PASS:
            pm = head_mask[:, None] & pass_mask[None, :]
            v = tl.load(x_row + pass_cols[None, :] * x_sd, mask=pm, other=0.0)
            tl.store(o_row + pass_cols[None, :] * o_sd, v.to(XO.dtype.element_ty), mask=pm)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    seq_len, n_q_heads, n_k_heads, half_rot, n_pass,
    q_sb, q_sh, q_ss, q_sd, qo_sb, qo_sh, qo_ss, qo_sd,
    k_sb, k_sh, k_ss, k_sd, ko_sb, ko_sh, ko_ss, ko_sd,
    c_sb, c_ss, c_sd, s_sb, s_ss, s_sd,
    BACKWARD: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr, INT64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    j = tl.arange(0, BLOCK_R)
    pair_mask = j < half_rot
    if INTERLEAVED:
        d1 = 2 * j
        d2 = 2 * j + 1
    else:
        d1 = j
        d2 = j + half_rot
    cos_row = COS + b * c_sb + s * c_ss
    sin_row = SIN + b * s_sb + s * s_ss
    c1 = tl.load(cos_row + d1 * c_sd, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + d2 * c_sd, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + d1 * s_sd, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + d2 * s_sd, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    p = tl.arange(0, BLOCK_P)
    pass_cols = 2 * half_rot + p
    pass_mask = p < n_pass
    _rotate_heads(
        Q, QO, b * q_sb + s * q_ss, b * qo_sb + s * qo_ss, q_sh, q_sd, qo_sh, qo_sd, n_q_heads,
        d1, d2, pair_mask, c1, c2, s1, s2, pass_cols, pass_mask,
        BACKWARD=BACKWARD, COPY_PASS=COPY_PASS, INT64=INT64, BLOCK_H=BLOCK_H,
    )
    _rotate_heads(
        K, KO, b * k_sb + s * k_ss, b * ko_sb + s * ko_ss, k_sh, k_sd, ko_sh, ko_sd, n_k_heads,
        d1, d2, pair_mask, c1, c2, s1, s2, pass_cols, pass_mask,
        BACKWARD=BACKWARD, COPY_PASS=COPY_PASS, INT64=INT64, BLOCK_H=BLOCK_H,
    )


def rope_launch(
    q: torch.Tensor, k: torch.Tensor | None, q_out: torch.Tensor, k_out: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, backward: bool, interleaved: bool, int64: bool,
) -> None:
    """Rotate ``[B, H, S, D]`` views ``q``/``k`` into ``q_out``/``k_out`` (which may be ``q``/``k``).

    ``cos``/``sin`` are ``[B or 1, S, rotary_dim]``. Features past ``rotary_dim`` are copied across
    when the outputs are separate buffers and left alone when rotating in place. With ``k=None``
    only ``q`` is rotated (its key loop runs zero times).
    """
    batch, n_q_heads, seq_len, head_dim = q.shape
    if k is None:
        k, k_out, n_k_heads = q, q_out, 0
    else:
        n_k_heads = k.shape[1]
    half_rot = cos.shape[-1] // 2
    n_pass = head_dim - 2 * half_rot
    copy_pass = n_pass > 0 and not (q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr())
    block_r = triton.next_power_of_2(max(half_rot, 1))
    block_h = min(triton.next_power_of_2(max(n_q_heads, n_k_heads)), max(1, 2048 // block_r))
    # A batch-1 cos/sin is broadcast over the batch with a zero stride.
    c_sb = cos.stride(0) if cos.shape[0] > 1 else 0
    s_sb = sin.stride(0) if sin.shape[0] > 1 else 0
    launch(_rope_kernel, (batch * seq_len,),
           (q, k, q_out, k_out, cos, sin, seq_len, n_q_heads, n_k_heads, half_rot, n_pass,
            *q.stride(), *q_out.stride(), *k.stride(), *k_out.stride(),
            c_sb, cos.stride(1), cos.stride(2), s_sb, sin.stride(1), sin.stride(2)),
           dict(BACKWARD=backward, INTERLEAVED=interleaved, COPY_PASS=copy_pass, INT64=int64,
                BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(max(n_pass, 1))),
           num_warps=4)
