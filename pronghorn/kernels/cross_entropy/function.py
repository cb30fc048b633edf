"""Fused LM head + cross-entropy: autograd Function and the public entry points.

The [N, V] logits never exist at once: tokens go through in chunks, and each chunk's logits
buffer is turned into its own gradient and consumed by two matmuls before the next chunk.
"""
from __future__ import annotations

import torch

from pronghorn.kernels.backend import use_triton
from pronghorn.kernels.cross_entropy.label_check import check_label_range
from pronghorn.kernels.cross_entropy.reference import (
    check_reduction,
    check_token_stats_out,
    fused_linear_cross_entropy_reference,
)
from pronghorn.training.loss import count_label_tokens, loss_divisor, next_token_labels

CPU_CHUNK_ROWS = 256
_MIN_CHUNK, _MAX_CHUNK = 1024, 65536
# The logits chunk is the training step's largest transient buffer. Beyond ~1K rows the LM-head GEMM runs
# no faster, so a larger chunk only raises peak memory (4096 rows of a 128K vocabulary: 1 GiB).
_MAX_CHUNK_BYTES = 512 * 2**20


_default_rows: list[int | None] = [None]


def set_default_chunk_rows(rows: int | None) -> None:
    """Token rows per chunk wherever a caller passes no ``chunk_size`` (None: pick from free memory, the
    default). Fewer rows mean a smaller logits buffer: the step's largest transient, which peak memory pays
    for wherever it does not reuse memory freed by the layers (with CUDA graphs of the layers it cannot)."""
    if rows is not None:
        _check_chunk_size(rows)
    _default_rows[0] = rows


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def pick_chunk_rows(n_rows: int, vocab: int, device: torch.device, chunk_size: int | None = None) -> int:
    """Token rows per chunk. Explicit ``chunk_size`` wins, then :func:`set_default_chunk_rows`; on CUDA, the
    largest power of two whose fp32 [rows, V] buffer fits in 1/8 of free memory and in 512 MiB, clamped to
    [1024, 65536]; on CPU 256."""
    chunk_size = _default_rows[0] if chunk_size is None else chunk_size
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
        return chunk_size
    if device.type != "cuda":
        return CPU_CHUNK_ROWS
    free, _total = torch.cuda.mem_get_info(device)
    budget = min(free // 8, _MAX_CHUNK_BYTES)
    rows = min(max(budget // (4 * max(vocab, 1)), _MIN_CHUNK), _MAX_CHUNK)
    return 1 << (int(rows).bit_length() - 1)


def _check_inputs(hidden, weight, labels, bias) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"fused_linear_cross_entropy: hidden must be [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden size mismatch, hidden is {tuple(hidden.shape)} "
                         f"but weight is {tuple(weight.shape)} ([V, H])")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: labels must be [N] = [{hidden.shape[0]}], "
                         f"got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"fused_linear_cross_entropy: labels must be integer class ids, got {labels.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"fused_linear_cross_entropy: hidden ({hidden.dtype}), weight ({weight.dtype}) and bias "
                        f"must share a dtype (outside autocast, cast them to one)")


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss ``L = (1/D) sum_i [lse(y_i) - y_i[t_i]]`` over rows ``i`` whose label ``t_i`` is not
    ignored, with ``a = x W^T + b`` (input dtype), ``z = s a`` (``s = logit_scale``),
    ``y = c tanh(z / c)`` when a softcap ``c`` is set (else ``y = z``), and ``D`` the divisor of
    :func:`pronghorn.training.loss.loss_divisor` (1 for ``reduction="sum"``).

    Gradient, row by row: ``dL/dy = (softmax(y) - onehot(t)) / D``; through the softcap
    ``dy/dz = 1 - tanh^2(z/c) = 1 - (y/c)^2``; ``dz/da = s``. So ``G = dL/da`` per row is
    ``(softmax(y) - onehot(t)) (1 - (y/c)^2) s / D`` (zero for ignored rows), and
    ``dL/dx = G W``, ``dL/dW = G^T x``, ``dL/db = sum_i G_i``.

    Forward computes all three per chunk while the chunk's logits are at hand (the kernel
    overwrites the logits with ``D * G``), so nothing of size [N, V] is saved. The 1/D and the
    incoming ``grad_output`` are applied in backward in fp32; keeping ``D * G`` (entries in
    [-|s|, |s|]) unscaled in the low-precision buffer keeps small probabilities above fp16's
    underflow. dL/dW accumulates over chunks in fp32. Backward rescales the stashed gradients
    in place, so the graph can be walked backward only once.

    With ``token_stats_out`` the kernel's first pass also gives each row's entropy and whether its
    label is the argmax, summed into that buffer (no gradient flows through them).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, logit_scale, num_items_in_batch,
                reduction, chunk_size, token_stats_out):
        from pronghorn.kernels.cross_entropy.triton import ce_rows_inplace

        n_rows, _hid = hidden.shape
        vocab = weight.shape[0]
        labels = labels.to(device=hidden.device, dtype=torch.int64).contiguous()
        check_label_range(labels, vocab, ignore_index)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and \
            ctx.needs_input_grad[2]
        rows_per_chunk = pick_chunk_rows(n_rows, vocab, hidden.device, chunk_size)
        n_chunks = -(-n_rows // rows_per_chunk)
        # fp16's range is too narrow for an unscaled dL/dW summed over many tokens: keep it in fp32.
        w_in_fp32 = need_w and (n_chunks > 1 or weight.dtype == torch.float16)

        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        grad_x = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_x else None
        grad_w = None
        if need_w and (w_in_fp32 or n_chunks == 0):
            grad_w = torch.zeros(weight.shape, dtype=torch.float32 if w_in_fp32 else weight.dtype,
                                 device=weight.device)
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        entropy_rows = top1_rows = None
        if token_stats_out is not None:
            entropy_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
            top1_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        w_t = weight.t()

        for start in range(0, n_rows, rows_per_chunk):
            end = min(start + rows_per_chunk, n_rows)
            x_c = hidden[start:end]
            logits = torch.addmm(bias, x_c, w_t) if bias is not None else torch.mm(x_c, w_t)
            ce_rows_inplace(logits, labels[start:end], loss_rows[start:end], ignore_index, logit_scale, softcap,
                            None if entropy_rows is None else entropy_rows[start:end],
                            None if top1_rows is None else top1_rows[start:end])
            grads = logits  # now holds D * dL/dlogits for this chunk
            if need_x:
                torch.mm(grads, weight, out=grad_x[start:end])
            if need_w:
                if not w_in_fp32:
                    grad_w = torch.mm(grads.t(), x_c)
                elif weight.dtype == torch.float32:
                    grad_w.addmm_(grads.t(), x_c)
                else:
                    grad_w += torch.mm(grads.t(), x_c)
            if need_b:
                grad_b += grads.sum(dim=0, dtype=torch.float32)
            del logits, grads

        n_label_tokens = count_label_tokens(labels, ignore_index)
        if token_stats_out is not None:
            token_stats_out += torch.stack([n_label_tokens.float(), top1_rows.sum(), entropy_rows.sum()])
        if reduction == "sum":
            divisor = torch.ones((), dtype=torch.float32, device=hidden.device)
        else:
            divisor = loss_divisor(n_label_tokens, num_items_in_batch, hidden.device)
        if w_in_fp32 and weight.dtype != torch.float16:
            grad_w = grad_w.to(weight.dtype)
        ctx.stash = (grad_x, grad_w, grad_b, divisor)
        ctx.dtype = weight.dtype
        ctx.done = False
        return loss_rows.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output):
        from pronghorn.kernels.cross_entropy.triton import scale_into

        if ctx.done:
            raise RuntimeError("fused_linear_cross_entropy rescales its stashed gradients in place, so its graph "
                               "can be walked backward only once (retain_graph is not supported)")
        ctx.done = True
        grad_x, grad_w, grad_b, divisor = ctx.stash
        ctx.stash = None
        factor = (grad_output.to(device=divisor.device, dtype=torch.float32) / divisor).reshape(1)
        if grad_x is not None:
            scale_into(grad_x, grad_x, factor)
        if grad_w is not None:
            target = grad_w if grad_w.dtype == ctx.dtype else torch.empty(grad_w.shape, dtype=ctx.dtype,
                                                                          device=grad_w.device)
            grad_w = scale_into(grad_w, target, factor)
        if grad_b is not None:
            grad_b = (grad_b * factor).to(ctx.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, softcap: float | None = None, logit_scale: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None, reduction: str = "mean", chunk_size: int | None = None,
    token_stats_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the LM head's logits without materialising them.

    Args:
        hidden: final hidden states ``[N, H]`` (any strides).
        weight: LM head weight ``[V, H]``; ``bias``: optional ``[V]``.
        labels: target ids ``[N]``, already aligned with ``hidden`` (no shift here).
        ignore_index: label value that contributes neither loss nor gradient.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma-2 style).
        logit_scale: multiplies the logits before the softcap (Cohere ``logit_scale``; Granite
            ``1 / logits_scaling``).
        num_items_in_batch: label tokens in the whole accumulated batch (gradient accumulation);
            see :mod:`pronghorn.training.loss` for the normalisation rule.
        reduction: ``"mean"`` (normalised as above) or ``"sum"`` (sum over label tokens).
        chunk_size: token rows per chunk; None picks it from free memory (see :func:`pick_chunk_rows`).
        token_stats_out: optional fp32 ``[3]`` tensor on ``hidden``'s device; this call adds, in place,
            its label-token count, how many of those have the label as the logits' argmax, and their
            summed entropy (nats): what ``mean_token_accuracy`` and ``entropy`` are logged from.

    Returns the fp32 scalar loss. Under autocast, hidden/weight/bias are cast to the autocast
    dtype first, as ``nn.Linear`` would be. Without Triton it runs the unfused reference.
    An all-ignored batch gives loss 0 and zero gradients, not NaN.
    """
    check_reduction(reduction)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check_inputs(hidden, weight, labels, bias)
    check_token_stats_out(token_stats_out, hidden.device)
    if not use_triton(hidden, weight):
        return fused_linear_cross_entropy_reference(hidden, weight, labels, bias, ignore_index, softcap, logit_scale,
                                                    num_items_in_batch, reduction, token_stats_out=token_stats_out)
    with torch.autocast(device_type, enabled=False):
        return FusedLinearCrossEntropyFunction.apply(
            hidden, weight, bias, labels, int(ignore_index), None if softcap is None else float(softcap),
            float(logit_scale), num_items_in_batch, reduction, chunk_size, token_stats_out,
        )


def causal_lm_fused_loss(
    hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None, *, lm_head_bias: torch.Tensor | None = None, ignore_index: int = -100,
    softcap: float | None = None, logit_scale: float = 1.0, num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None, token_stats_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token loss of a causal LM from its final hidden states, Hugging Face semantics.

    Args:
        hidden_states: ``[B, S, H]``.
        lm_head_weight: ``[V, H]``; ``lm_head_bias``: optional ``[V]``.
        labels: ``[B, S]`` unshifted (position t's label is the token at t); shifted here, the
            last position of each row getting ``ignore_index``.
        shift_labels: ``[B, S]`` already shifted (as TRL/transformers pass for padding-free and
            packed batches); give exactly one of ``labels`` and ``shift_labels``.
        ignore_index, softcap, logit_scale, num_items_in_batch, chunk_size, token_stats_out: as in
            :func:`fused_linear_cross_entropy` (mean reduction).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("causal_lm_fused_loss: pass exactly one of labels (unshifted) and shift_labels (shifted)")
    if hidden_states.dim() != 3:
        raise ValueError(f"causal_lm_fused_loss: hidden_states must be [B, S, H], got {tuple(hidden_states.shape)}")
    batch, seq, hid = hidden_states.shape
    if shift_labels is None:
        if labels.shape != (batch, seq):
            raise ValueError(f"causal_lm_fused_loss: labels must be [B, S] = {(batch, seq)}, got {tuple(labels.shape)}")
        shift_labels = next_token_labels(labels, ignore_index)
    elif shift_labels.shape != (batch, seq):
        raise ValueError(f"causal_lm_fused_loss: shift_labels must be [B, S] = {(batch, seq)}, "
                         f"got {tuple(shift_labels.shape)}")
    return fused_linear_cross_entropy(
        hidden_states.reshape(batch * seq, hid), lm_head_weight, shift_labels.reshape(-1), lm_head_bias,
        ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
        num_items_in_batch=num_items_in_batch, reduction="mean", chunk_size=chunk_size,
        token_stats_out=token_stats_out,
    )
