"""RMSNorm as an autograd Function over the Triton kernels, and the public ``rms_norm`` entry point."""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import use_triton
from pronghorn.kernels.rms_norm.reference import check_cast_mode, rms_norm_output_dtype, rms_norm_reference


class RMSNormFunction(torch.autograd.Function):
    r"""RMSNorm with a hand-written backward.

    Forward, per row of length N with ``s = offset + w``:

        r = (mean(x^2) + eps)^(-1/2),   n = x * r,   y = n * s

    Backward. From ``dr/dx_j = -r^3 x_j / N``,

        dy/dn -> dn = dy * s
        dx_j  = sum_i dn_i * dn_i/dx_j = r * dn_j - (r^3 x_j / N) * sum_i dn_i x_i
              = r * (dn_j - n_j * mean(dn * n))
        dw    = sum over rows of dy * n

    In ``llama`` cast mode ``n`` is rounded to the input dtype before the product, so ``dw`` uses that
    rounded ``n`` (as autograd through Hugging Face's module does); ``dx`` is taken in fp32, treating
    the rounding as the identity, which is what autograd does for a dtype cast.

    Only ``x`` (the input, no copy) and one fp32 ``r`` per row are saved. ``dw`` is reduced over rows
    by per-program fp32 partial sums and one final sum. With ``in_place_backward`` the kernel writes
    ``dx`` into ``dy``'s buffer when it is a dense tensor of ``x``'s shape and dtype: that saves an
    allocation but is only correct when nothing else reads that gradient buffer (true for a pre-norm
    whose output feeds linear layers; false for a post-norm added straight into a residual, whose
    gradient tensor is shared with the residual branch).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_mode, in_place_backward):
        from pronghorn.kernels.norm_rows import offsets_need_int64, rows_view
        from pronghorn.kernels.rms_norm.triton import rms_norm_fwd

        x2d = rows_view(x)
        cast_llama = cast_mode == "llama"
        int64 = offsets_need_int64(x2d)
        y2d, rstd = rms_norm_fwd(
            x2d, weight, eps, offset, cast_llama, rms_norm_output_dtype(x, weight, cast_mode), int64
        )
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.cast_llama, ctx.int64 = offset, cast_llama, int64
        ctx.in_place_backward = in_place_backward
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y2d.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from pronghorn.kernels.norm_rows import backward_rows, offsets_need_int64
        from pronghorn.kernels.rms_norm.triton import rms_norm_bwd

        x2d, weight, rstd = ctx.saved_tensors
        dy2d, dx2d = backward_rows(dy, x2d, ctx.x_shape, ctx.x_dtype, ctx.in_place_backward)
        compute_dw = ctx.needs_input_grad[1]
        int64 = ctx.int64 or offsets_need_int64(dy2d, dx2d)
        dw = rms_norm_bwd(dy2d, x2d, weight, rstd, ctx.offset, ctx.cast_llama, compute_dw, dx2d, int64)
        dx = dx2d.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_mode: str = "llama",
    *,
    in_place_backward: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dimension, matching Hugging Face's modules exactly in dtype handling.

    Args:
        x: ``[..., hidden]`` activations (any strides; the last dim is used as the row).
        weight: ``[hidden]`` scale.
        eps: added to the mean square.
        offset: 0.0 for Llama-style ``w * x``; 1.0 for Gemma-style ``(1 + w) * x``.
        cast_mode: ``"llama"`` (cast normalised x to the input dtype, then multiply by ``w``; output
            dtype promotes input with weight) or ``"gemma"`` (multiply in fp32, cast to the input dtype).
        in_place_backward: write ``dx`` into the incoming gradient's buffer where its layout allows.
            Only for norms whose output gradient is not shared with another branch (see
            :class:`RMSNormFunction`).

    Runs the Triton kernels where :func:`pronghorn.kernels.backend.use_triton` allows, and the plain
    PyTorch reference elsewhere (no Triton, or rows wider than the fused kernel holds).
    """
    check_cast_mode(cast_mode)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape [{x.shape[-1]}] to match x's last dim, got {tuple(weight.shape)}"
        )
    if not use_triton(x, weight) or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, offset, cast_mode)
    # Imported here: the kernel module needs triton, which use_triton has just confirmed.
    from pronghorn.kernels.norm_rows import MAX_FUSED_COLS

    if x.shape[-1] > MAX_FUSED_COLS:
        return rms_norm_reference(x, weight, eps, offset, cast_mode)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), cast_mode, in_place_backward)
