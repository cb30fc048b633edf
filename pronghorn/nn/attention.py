"""One place that decides which attention implementation a model trains with, and why.

The choice is made from what is installed, the device, and what the model's attention needs:

- ``flash_attention_3`` (package ``flash_attn_interface``, Hopper GPUs) or ``flash_attention_2``
  (package ``flash_attn``): varlen kernels, so padding-free batches cost nothing extra; both take
  ``softcap`` and sliding windows.
- ``pronghorn_sdpa_varlen`` (this module): on CUDA, PyTorch's own varlen flash attention
  (``torch.nn.attention.varlen``, torch >= 2.10) over the whole padding-free / packed stream in one
  launch; elsewhere ``scaled_dot_product_attention`` run once per sequence of the stream. Without
  it, transformers' ``sdpa`` builds a dense ``[tokens, tokens]`` block-diagonal mask for a packed
  stream, which forces sdpa off its flash kernel and spends attention FLOPs on every cross-sequence
  block. Both of ours keep causal flash kernels and the exact cost ``sum(len_i^2)``. Rows that hold
  one whole sequence each take plain causal sdpa (cuDNN where :func:`sdpa_backend_policy` says it
  pays). Padded batches (a 2-D ``attention_mask``) and decoding with a cache go through transformers'
  own ``sdpa``, under the same backend policy.
- ``pronghorn_sdpa`` (this module): transformers' ``sdpa`` under that backend policy; VLMs use it on CUDA.
- ``eager``: attention logit softcapping (Gemma 2) on CPU, or when nothing faster supports it.
  ``flex_attention`` supports softcapping too but compiles per distinct shape (a padding-free
  stream changes length every step) and has no CPU backward, so it is used only when requested.

The implementation is set through transformers' official ``model.set_attn_implementation`` and
the custom function is registered with ``AttentionInterface`` / ``AttentionMaskInterface`` (at the
first call, never at import).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pronghorn.nn.positions import holds_one_sequence_per_row

__all__ = [
    "POLICY_SDPA",
    "VARLEN_SDPA",
    "AttentionChoice",
    "choose_attention_implementation",
    "graph_capture_calls",
    "installed_attention_backends",
    "policy_sdpa_attention",
    "register_policy_sdpa",
    "register_varlen_sdpa",
    "sdpa_backend_policy",
    "set_attention_implementation",
    "varlen_flash_kernel",
    "varlen_sdpa_attention",
]

logger = logging.getLogger(__name__)

VARLEN_SDPA = "pronghorn_sdpa_varlen"
POLICY_SDPA = "pronghorn_sdpa"

# Decoder-only text families whose masks are plain causal (optionally sliding-window): the varlen
# function reproduces them exactly. Families with bidirectional image blocks, chunked attention or
# attention sinks keep transformers' own implementations.
_VARLEN_FAMILIES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma3_text",
    "phi3", "granite", "olmo2", "cohere",
}
# Above this many sequences in one row a single masked sdpa call beats one launch per sequence.
_MAX_SEGMENTS_FOR_LOOP = 64


@dataclass(frozen=True)
class AttentionChoice:
    """The implementation chosen (a value for ``attn_implementation``) and the reason, for the log."""

    implementation: str
    reason: str


def installed_attention_backends() -> dict[str, bool]:
    """Which optional attention packages are importable here (no import is performed)."""
    return {
        "flash_attention_2": importlib.util.find_spec("flash_attn") is not None,
        "flash_attention_3": importlib.util.find_spec("flash_attn_interface") is not None,
    }


def _config_of(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _model_class_flag(model_or_config, flag: str, default: bool) -> bool:
    base = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
    return bool(getattr(base, flag, default)) if isinstance(base, torch.nn.Module) else default


def choose_attention_implementation(
    model_or_config,
    *,
    device: torch.device | str | None = None,
    requested: str | None = None,
    padding_free: bool = True,
) -> AttentionChoice:
    """Pick the attention implementation for training ``model_or_config``.

    Args:
        model_or_config: a transformers model (PEFT-wrapped or not) or its config.
        device: where training runs; default CUDA when available, else CPU.
        requested: an explicit ``attn_implementation`` from the user; it is honoured (and checked
            against softcapping) rather than second-guessed.
        padding_free: whether batches will be padding-free / packed streams (the default in pronghorn).
    """
    config = _config_of(model_or_config)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    softcap = getattr(config, "attn_logit_softcapping", None)
    model_type = getattr(config, "model_type", "")
    installed = installed_attention_backends()

    if requested is not None:
        if softcap is not None and requested in ("sdpa", VARLEN_SDPA):
            raise ValueError(
                f"attn_implementation={requested!r} cannot apply {model_type}'s attention logit softcapping "
                f"({softcap}); use 'eager', 'flex_attention', 'flash_attention_2' or leave it unset"
            )
        return AttentionChoice(requested, "requested by the user")

    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        if installed["flash_attention_3"] and major == 9:
            return AttentionChoice("flash_attention_3", "flash_attn_interface is installed and the GPU is Hopper")
        if installed["flash_attention_2"] and major >= 8:
            return AttentionChoice("flash_attention_2", "flash_attn is installed (varlen kernels, softcap support)")
    if softcap is not None:
        return AttentionChoice(
            "eager", f"{model_type} uses attention logit softcapping ({softcap}), which sdpa cannot apply, and "
            "no flash-attention package is installed"
        )
    supports_sdpa = _model_class_flag(model_or_config, "_supports_sdpa", True)
    if not supports_sdpa:
        return AttentionChoice("eager", f"{type(model_or_config).__name__} does not support sdpa")
    if padding_free and model_type in _VARLEN_FAMILIES:
        return AttentionChoice(
            VARLEN_SDPA, "no flash-attention package; padding-free batches run sdpa once per sequence "
            "(causal flash kernel, no cross-sequence FLOPs)"
        )
    return AttentionChoice("sdpa", "no flash-attention package; torch scaled_dot_product_attention")


def set_attention_implementation(model, implementation: str | AttentionChoice) -> str:
    """Set ``implementation`` on ``model`` through ``set_attn_implementation``; returns the previous one.

    Registers :data:`VARLEN_SDPA` with transformers first when it is the one asked for.
    """
    if isinstance(implementation, AttentionChoice):
        logger.info("pronghorn: attention %s (%s)", implementation.implementation, implementation.reason)
        implementation = implementation.implementation
    if implementation == VARLEN_SDPA:
        register_varlen_sdpa()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    base.set_attn_implementation(implementation)
    return previous


def register_varlen_sdpa() -> None:
    """Make :data:`VARLEN_SDPA` a valid ``attn_implementation`` in transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, _varlen_sdpa_mask)


def _varlen_sdpa_mask(*args, attention_mask=None, **kwargs):
    """Build a dense mask only for padded batches; a stream without a padding mask needs none here."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


_SEGMENT_CACHE: list = [None, None, None]  # [weakref to position_ids, per-row lengths, cu_seqlens on device]


def _segment_lengths(position_ids: torch.Tensor | None, batch: int, length: int) -> list[list[int]]:
    """Per row, the lengths of the sequences in it: a new one starts wherever the position does not
    advance by one (the rule transformers uses for packed sequences)."""
    if position_ids is None or holds_one_sequence_per_row(position_ids):
        return [[length]] * batch
    cached = _SEGMENT_CACHE[0]() if _SEGMENT_CACHE[0] is not None else None
    # Every layer (and every recompute) reads the same position_ids object: one host sync per step.
    if cached is position_ids:
        return _SEGMENT_CACHE[1]
    pos = position_ids.expand(batch, -1)
    starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
    rows = []
    for row in starts.cpu():
        idx = row.nonzero().flatten().tolist()
        idx = ([0] if not idx or idx[0] != 0 else []) + idx + [length]
        rows.append([b - a for a, b in zip(idx[:-1], idx[1:])])
    _SEGMENT_CACHE[0], _SEGMENT_CACHE[1], _SEGMENT_CACHE[2] = weakref.ref(position_ids), rows, None
    return rows


def _cu_seqlens(position_ids, rows: list[list[int]], device) -> torch.Tensor:
    """Cumulative sequence starts over all rows (int32, on ``device``), cached with the lengths."""
    if position_ids is not None and _SEGMENT_CACHE[1] is rows and _SEGMENT_CACHE[2] is not None:
        return _SEGMENT_CACHE[2]
    lengths = [n for row in rows for n in row]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    if position_ids is not None and _SEGMENT_CACHE[1] is rows:
        _SEGMENT_CACHE[2] = cu
    return cu


@functools.lru_cache(maxsize=None)
def varlen_flash_kernel():
    """PyTorch's own varlen flash attention (torch >= 2.10) and the keyword style it takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


def _flat_varlen_attention(kernel, query, key, value, rows, position_ids, scaling, sliding_window):
    """One flash-attention launch over every sequence of every row, or None where the kernel cannot apply."""
    varlen_attn, has_window, has_gqa = kernel
    if sliding_window is not None and not has_window:
        return None
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]

    def flat(t):
        return t.transpose(1, 2).reshape(batch * q_len, t.shape[1], dim)

    q, k, v = flat(query), flat(key), flat(value)
    kwargs = {"scale": scaling}
    if kv_heads != heads:
        if has_gqa:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    if has_window:
        # transformers' window w lets query i see keys i-w+1 .. i
        kwargs["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    else:
        kwargs["is_causal"] = True
    cu = _cu_seqlens(position_ids, rows, query.device)
    longest = max(n for row in rows for n in row)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)
    return out.reshape(batch, q_len, heads, dim)


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _block_causal_mask(lengths: list[int], window: int | None, device) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    mask = (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


# cuDNN attention, torch's first sdpa choice on Hopper, runs causal attention about 1.7x as fast as the flash
# kernel (H100, 2K to 64K tokens: benchmarks/results/kernels/bench_attention.*), but builds a plan for every
# new shape, about 130 ms for forward and backward. Where lengths change from batch to batch (padding-free
# rows, VLM image sizes, padded batches) those plans cost more than cuDNN saves, so it is used only for
# lengths where one step's savings repay a plan, or for shapes that keep coming back. A call captured into a
# CUDA graph (pronghorn.memory.layer_graphs) is one such shape: every replay runs what the capture chose, and a
# graph captured early with the flash kernel ran the 8B forward 5 ms a step slower than cuDNN
# (benchmarks/results/2026-11-23-graph-attention.md).
CUDNN_MIN_LENGTH = 8192
CUDNN_AFTER_CALLS = 128
_SHAPE_CALLS: dict[tuple, int] = {}
_GRAPH_CALLS = [0]  # depth of graph_capture_calls()


@contextlib.contextmanager
def graph_capture_calls():
    """Mark the enclosed attention calls as a CUDA graph's warm-up and capture: they take cuDNN whatever their
    shape. The warm-up must choose as the capture does, since cuDNN cannot build its plan while capturing."""
    _GRAPH_CALLS[0] += 1
    try:
        yield
    finally:
        _GRAPH_CALLS[0] -= 1


def _prefers_cudnn(query: torch.Tensor) -> bool:
    if _GRAPH_CALLS[0]:
        return True
    shape = (tuple(query.shape), query.dtype, query.device)
    if len(_SHAPE_CALLS) > 4096:
        _SHAPE_CALLS.clear()
    calls = _SHAPE_CALLS[shape] = _SHAPE_CALLS.get(shape, 0) + 1
    return query.shape[-2] >= CUDNN_MIN_LENGTH or calls > CUDNN_AFTER_CALLS


def sdpa_backend_policy(query: torch.Tensor):
    """Context for one sdpa call on ``query`` ``[batch, heads, length, dim]``: cuDNN first where it pays
    (see above), otherwise every backend but cuDNN. A no-op off CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not query.is_cuda:
        return contextlib.nullcontext()
    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if _prefers_cudnn(query):
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, *others], set_priority=True)
    return sdpa_kernel(others, set_priority=True)


def policy_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own sdpa attention function under :func:`sdpa_backend_policy`; registered as
    :data:`POLICY_SDPA` for models whose attention stays Hugging Face's (VLM towers and language models)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with sdpa_backend_policy(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_policy_sdpa() -> None:
    """Make :data:`POLICY_SDPA` a valid ``attn_implementation`` (idempotent); masks are sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(POLICY_SDPA, policy_sdpa_attention)
    AttentionMaskInterface.register(POLICY_SDPA, sdpa_mask)


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over ``[batch, heads, tokens, dim]`` where each row may hold several sequences.

    Signature of a transformers attention function; returns ``([batch, tokens, heads, dim], None)``.
    """
    if softcap is not None:
        raise ValueError(f"{VARLEN_SDPA} cannot apply attention logit softcapping; use eager or flash attention")
    batch, _, q_len, _ = query.shape
    if attention_mask is not None or q_len != key.shape[2]:
        # Padded batch or decoding against a cache: transformers' sdpa with its dense mask is exact.
        return policy_sdpa_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, position_ids=position_ids, **kwargs,
        )
    segments = _segment_lengths(position_ids, batch, q_len)
    gqa = query.shape[1] != key.shape[1]
    if query.is_cuda and all(row == [q_len] for row in segments) and (sliding_window is None or sliding_window >= q_len):
        # Every row is one whole sequence: plain causal sdpa (native GQA, cuDNN where it pays).
        with sdpa_backend_policy(query):
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                                 scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if query.is_cuda and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16):
        kernel = varlen_flash_kernel()
        if kernel is not None:
            # One launch for the whole stream; a loop of per-sequence sdpa calls also meets a new shape
            # per sequence, which some sdpa backends (cuDNN) pay for with a fresh plan each time.
            out = _flat_varlen_attention(kernel, query, key, value, segments, position_ids, scaling, sliding_window)
            if out is not None:
                return out, None
    rows = []
    for b, lengths in enumerate(segments):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        if len(lengths) > _MAX_SEGMENTS_FOR_LOOP:
            mask = _block_causal_mask(lengths, sliding_window, query.device)
            with sdpa_backend_policy(q):
                rows.append(F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
            continue
        pieces, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            if sliding_window is not None and n > sliding_window:
                kw = dict(attn_mask=_window_mask(n, sliding_window, query.device))
            else:
                kw = dict(is_causal=True)
            with sdpa_backend_policy(q[:, :, sl]):
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, sl], k[:, :, sl], v[:, :, sl], dropout_p=dropout, scale=scaling, enable_gqa=gqa, **kw))
            start += n
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if batch > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None
