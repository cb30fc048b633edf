"""Frozen input embeddings kept in pinned host memory, looked up by the GPU straight from there.

LoRA leaves the input embedding table frozen, and a step reads only the rows of its tokens: 4,096 of
Llama-3.1-8B's 128,256 (32 MiB of a 1.0 GiB table). So the table can live in host memory. A Triton kernel
(:mod:`pronghorn.kernels.row_gather`) reads those rows over PCIe into the step's embeddings. The ids never
travel to the host, and the host never waits. The GPU gets the table's size back, for the whole run.

Only tables that nothing else reads are moved: a plain :class:`torch.nn.Embedding` that is frozen and not tied
to the LM head (Gemma's and small Qwen models' tables are tied, and the LM head needs them on the GPU every
step). Its weight becomes a buffer of the same name, so ``state_dict`` keys, saving and merged exports stay
as they were. ``model.device`` keeps naming the GPU: Hugging Face reads it from the first *parameter*.
``model.to(...)`` and ``.half()`` change the dtype of the host table and the device the lookups write to,
but leave the table in host memory.

``get_peft_model(..., offload_embedding=False)`` or ``PRONGHORN_OFFLOAD_EMBEDDING=0`` keeps the table on the
GPU; :func:`restore_input_embeddings` moves it back (training the embeddings, say).
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from pronghorn.kernels.row_gather import gather_rows
from pronghorn.memory.offload import available_host_bytes, host_reserve_bytes

__all__ = ["HostEmbedding", "offload_enabled", "offload_input_embeddings", "restore_input_embeddings"]

logger = logging.getLogger(__name__)

ENV = "PRONGHORN_OFFLOAD_EMBEDDING"
# The first lookups check on the host that every id is in the table (a tokenizer/model vocabulary mismatch
# shows up at once); later ones do not wait for the GPU, and an id outside the table gives a row of NaNs.
SYNC_CHECKS = 8


def offload_enabled(requested: bool | None = None) -> bool:
    """``requested`` when given, else ``PRONGHORN_OFFLOAD_EMBEDDING`` (on unless 0/false/no/off)."""
    if requested is not None:
        return bool(requested)
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _pinned_copy(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    host = torch.empty(weight.shape, dtype=dtype or weight.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(weight.detach())
    return host


class HostEmbedding(nn.Module):
    """A frozen embedding whose table is in (pinned) host memory; lookups land on ``output_device``.

    Args:
        embedding: the :class:`torch.nn.Embedding` to replace; its table is copied to host memory.
        output_device: where lookups write (default: where the table was).
    """

    def __init__(self, embedding: nn.Embedding, output_device: torch.device | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.output_device = torch.device(output_device or embedding.weight.device)
        self.register_buffer("weight", _pinned_copy(embedding.weight))
        self.lookups = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.lookups += 1
        if self.lookups <= SYNC_CHECKS:
            self._check_ids(input_ids)
        device = input_ids.device if input_ids.device.type != "cpu" else self.output_device
        return gather_rows(self.weight, input_ids, device)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.num_embeddings:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is outside the input embedding table of {self.num_embeddings} rows: the "
                "tokenizer's vocabulary does not match the model's (resize the embeddings with "
                "model.resize_token_embeddings(len(tokenizer)) before get_peft_model)")

    def _apply(self, fn, recurse=True):
        # Module.to()/.half()/.cuda() reach buffers through here: follow the dtype and the target device, but
        # keep the table itself in host memory (the reason this module exists).
        probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.output_device))
        if probe.dtype != self.weight.dtype:
            self.weight = _pinned_copy(self.weight, probe.dtype)
        self.output_device = probe.device
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table in host memory, lookups on {self.output_device}"


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _why_not(embedding, output) -> str | None:
    """Why this input embedding must stay on the GPU, or None when it can move to host memory."""
    if type(embedding) is not nn.Embedding:
        return f"{type(embedding).__name__} is not a plain nn.Embedding"
    weight = embedding.weight
    if weight.requires_grad:
        return "it is trained"
    if embedding.max_norm is not None:
        return "it renormalizes rows (max_norm)"
    out_weight = getattr(output, "weight", None)
    if isinstance(out_weight, torch.Tensor) and out_weight.data_ptr() == weight.data_ptr():
        return "it is tied to the LM head"
    if not weight.is_cuda:
        return "its table is not on a GPU"
    avail = available_host_bytes()
    nbytes = weight.numel() * weight.element_size()
    if avail is not None and nbytes > avail - host_reserve_bytes():
        return f"host memory is short ({avail / 2**30:.1f} GiB available for a {nbytes / 2**30:.1f} GiB table)"
    return None


def offload_input_embeddings(model: nn.Module) -> bool:
    """Move ``model``'s input embedding table to pinned host memory when nothing else needs it on the GPU (see
    the module docstring); returns whether it moved."""
    base = _base(model)
    embedding = base.get_input_embeddings()
    if isinstance(embedding, HostEmbedding):
        return True
    reason = _why_not(embedding, base.get_output_embeddings())
    if reason is not None:
        logger.info("pronghorn: the input embeddings stay on the GPU: %s", reason)
        return False
    host = HostEmbedding(embedding)
    host._forward_hooks.update(embedding._forward_hooks)  # e.g. enable_input_require_grads
    base.set_input_embeddings(host)
    logger.info("pronghorn: input embeddings (%d x %d) moved to pinned host memory; %.2f GiB of GPU memory freed",
                host.num_embeddings, host.embedding_dim,
                host.weight.numel() * host.weight.element_size() / 2**30)
    return True


def restore_input_embeddings(model: nn.Module) -> bool:
    """Put a table moved by :func:`offload_input_embeddings` back on its GPU as an ``nn.Embedding``; returns
    whether there was one to move."""
    base = _base(model)
    host = base.get_input_embeddings()
    if not isinstance(host, HostEmbedding):
        return False
    embedding = nn.Embedding(host.num_embeddings, host.embedding_dim, padding_idx=host.padding_idx,
                             device="meta", dtype=host.weight.dtype)
    embedding.weight = nn.Parameter(host.weight.to(host.output_device), requires_grad=False)
    embedding._forward_hooks.update(host._forward_hooks)
    base.set_input_embeddings(embedding)
    return True
