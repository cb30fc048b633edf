"""LayerNorm as an autograd Function over the Triton kernels, and the public ``layer_norm`` entry point."""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import use_triton
from pronghorn.kernels.layer_norm.reference import layer_norm_reference


class LayerNormFunction(torch.autograd.Function):
    r"""LayerNorm with a hand-written backward.

    Forward, per row of length N: ``mu = mean(x)``, ``r = (mean((x - mu)^2) + eps)^(-1/2)``,
    ``xhat = (x - mu) * r``, ``y = xhat * w + b``.

    Backward. With ``g = dy * w`` (the gradient reaching ``xhat``) and using
    ``dxhat_i/dx_j = r * (delta_ij - 1/N - xhat_i xhat_j / N)``:

        dx = r * (g - mean(g) - xhat * mean(g * xhat))
        dw = sum over rows of dy * xhat
        db = sum over rows of dy

    Saved for backward: ``x`` (no copy) and fp32 ``mu`` and ``r`` per row. ``dw``/``db`` are reduced
    over rows by per-program fp32 partial sums then one sum, and are skipped when not required
    (frozen norms under LoRA). ``in_place_backward`` writes ``dx`` into ``dy``'s buffer where the
    layout allows; only correct when that gradient tensor is not shared with another branch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, in_place_backward):
        from pronghorn.kernels.layer_norm.triton import layer_norm_fwd
        from pronghorn.kernels.norm_rows import offsets_need_int64, rows_view

        x2d = rows_view(x)
        int64 = offsets_need_int64(x2d)
        y2d, mean, rstd = layer_norm_fwd(x2d, weight, bias, eps, int64)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.int64, ctx.in_place_backward = int64, in_place_backward
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y2d.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from pronghorn.kernels.layer_norm.triton import layer_norm_bwd
        from pronghorn.kernels.norm_rows import backward_rows, offsets_need_int64

        x2d, weight, mean, rstd = ctx.saved_tensors
        dy2d, dx2d = backward_rows(dy, x2d, ctx.x_shape, ctx.x_dtype, ctx.in_place_backward)
        compute_dw = weight is not None and ctx.needs_input_grad[1]
        compute_db = ctx.has_bias and ctx.needs_input_grad[2]
        int64 = ctx.int64 or offsets_need_int64(dy2d, dx2d)
        dw, db = layer_norm_bwd(dy2d, x2d, weight, mean, rstd, compute_dw, compute_db, dx2d, int64)
        dx = dx2d.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(ctx.bias_dtype) if db is not None else None
        return dx, dw, db, None, None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    in_place_backward: bool = False,
) -> torch.Tensor:
    """LayerNorm over the last dimension with fp32 statistics; the output has ``x``'s dtype.

    Args:
        x: ``[..., hidden]`` activations (any strides).
        weight: ``[hidden]`` scale, or None for no scale.
        bias: ``[hidden]`` shift, or None.
        eps: added to the (biased) variance.
        in_place_backward: write ``dx`` into the incoming gradient's buffer where its layout allows;
            only for norms whose output gradient is not shared with another branch.

    Runs the Triton kernels where :func:`pronghorn.kernels.backend.use_triton` allows, the plain
    PyTorch reference elsewhere.
    """
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != n):
            raise ValueError(f"layer_norm: {name} must have shape [{n}] to match x's last dim, got {tuple(t.shape)}")
    present = [t for t in (x, weight, bias) if t is not None]
    if not use_triton(*present) or x.numel() == 0:
        return layer_norm_reference(x, weight, bias, eps)
    # Imported here: the kernel module needs triton, which use_triton has just confirmed.
    from pronghorn.kernels.norm_rows import MAX_FUSED_COLS

    if n > MAX_FUSED_COLS:
        return layer_norm_reference(x, weight, bias, eps)
    return LayerNormFunction.apply(x, weight, bias, float(eps), in_place_backward)
