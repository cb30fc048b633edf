"""Frozen input embeddings kept in page-locked host memory, looked up by the GPU straight from there.

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
import weakref

import torch
from torch import nn

from pronghorn.export.merge import unwrap_base_model
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


def _page_locked_copy(weight: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int | None]:
    """A host copy of ``weight`` and, where CUDA registered (page-locked) its memory in place, the address to
    unregister. Registering locks exactly the table's bytes: ``pin_memory()`` would round the block up to a power
    of two (2 GiB for Qwen3-8B's 1.16 GiB table). Where registering fails, ``pin_memory()`` it is."""
    host = torch.empty(weight.shape, dtype=dtype or weight.dtype)
    host.copy_(weight.detach())
    if not torch.cuda.is_available() or host.numel() == 0:
        return host, None
    # 0 = cudaHostRegisterDefault: with unified addressing the memory is mapped for kernels and portable.
    error = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0))
    if error != 0:
        logger.info("pronghorn: cudaHostRegister failed (cudaError %d); pinning a copy instead", error)
        return host.pin_memory(), None
    return host, host.data_ptr()


def _unregister(address: int | None) -> None:
    if address is not None:
        torch.cuda.cudart().cudaHostUnregister(address)


_UNLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HostEmbedding -> finalizer unregistering its table


class HostEmbedding(nn.Module):
    """A frozen embedding whose table is in page-locked host memory (plain host memory without CUDA); lookups
    land on ``output_device``.

    Args:
        embedding: the :class:`torch.nn.Embedding` to replace; its table is copied to host memory.
        output_device: where lookups write (default: where the table was).
    """

    def __init__(self, embedding: nn.Embedding, output_device: torch.device | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.output_device = torch.device(output_device or embedding.weight.device)
        self.register_buffer("weight", None)
        self._set_table(embedding.weight)
        self.lookups = 0

    def _set_table(self, source: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Page-lock a host copy of ``source`` as the table; the previous table is unlocked first (freeing memory
        that is still registered would leave its pages locked)."""
        table, address = _page_locked_copy(source, dtype)
        self.unlock()
        self.weight = table
        # Runs when the module goes (before its tensors are freed) or the table is replaced. Kept outside the
        # module, which then deep-copies as any other (the copy's table is plain host memory).
        _UNLOCKS[self] = weakref.finalize(self, _unregister, address)

    def unlock(self) -> None:
        """Release the page lock of the table (it stays readable, as plain host memory)."""
        finalizer = _UNLOCKS.pop(self, None)
        if finalizer is not None:
            finalizer()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.lookups += 1
        if self.lookups <= SYNC_CHECKS:
            self._check_ids(input_ids)
        device = input_ids.device if input_ids.device.type != "cpu" else self.output_device
        return gather_rows(self.weight, input_ids, device)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.numel() == 0:
            return
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one reduction, one read back
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
            self._set_table(self.weight, probe.dtype)
        self.output_device = probe.device
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table in host memory, lookups on {self.output_device}"


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
    """Move ``model``'s input embedding table to page-locked host memory when nothing else needs it on the GPU (see
    the module docstring); returns whether it moved."""
    base = unwrap_base_model(model)
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
    logger.info("pronghorn: input embeddings (%d x %d) moved to page-locked host memory; %.2f GiB of GPU memory freed",
                host.num_embeddings, host.embedding_dim,
                host.weight.numel() * host.weight.element_size() / 2**30)
    return True


def restore_input_embeddings(model: nn.Module) -> bool:
    """Put a table moved by :func:`offload_input_embeddings` back on its GPU as an ``nn.Embedding``; returns
    whether there was one to move."""
    base = unwrap_base_model(model)
    host = base.get_input_embeddings()
    if not isinstance(host, HostEmbedding):
        return False
    embedding = nn.Embedding(host.num_embeddings, host.embedding_dim, padding_idx=host.padding_idx,
                             device="meta", dtype=host.weight.dtype)
    embedding.weight = nn.Parameter(host.weight.to(host.output_device), requires_grad=False)
    embedding._forward_hooks.update(host._forward_hooks)
    base.set_input_embeddings(embedding)
    host.unlock()
    return True
