"""The check that every label is a class id or ``ignore_index``: the kernel would silently treat an out-of-range
label as "no target".

Reading the answer on the host waits for the GPU to finish everything queued before it: on CUDA that is the
whole forward pass, after which the GPU idles until the host has queued the loss and the start of backward,
every step. So the first :data:`SYNC_CHECKS` calls (where a tokenizer/LM-head mismatch shows up) check at once,
and later calls only queue the check: its result travels to pinned host memory behind the step and is read by
the next call, which raises then, naming the batch it came from (the step that had the bad label has trained
with those positions ignored).

The synchronous calls run the same kernels and the same copy into pinned buffers as the queued ones, and the
queued ones reuse those buffers: page-locking a new host block, and loading a kernel at its first launch, in
the first steps that queued a check held up an H100 machine's step by 30-180 ms
(benchmarks/results/2026-11-23-label-check-stall.md).
"""
from __future__ import annotations

import torch

SYNC_CHECKS = 8
# Queued checks in flight at once: the host runs at most about a step ahead of the GPU, so one or two are
# unfinished when the next call comes; a call that finds none free makes one more.
PINNED_RESULTS = 3


class LabelRangeCheck:
    def __init__(self):
        self.calls = 0
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event, int, int, bool]] = []
        self._free: list[torch.Tensor] = []  # pinned [2] result buffers whose check has been read

    def __call__(self, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
        self.raise_finished()
        self.calls += 1
        found = _first_bad(labels, vocab, ignore_index)
        if not labels.is_cuda:
            bad, label = found.tolist()
            if bad:
                _raise(label, vocab, ignore_index, "")
            return
        if not self._free and not self._pending:  # the first call
            self._free = [torch.empty(2, dtype=labels.dtype, pin_memory=True) for _ in range(PINNED_RESULTS)]
        # The synchronous calls run the same kernels and copy as the queued ones, so the first queued call
        # loads no kernel (a lazily loaded kernel's first launch stalled the host too) and pins nothing.
        host = self._pinned(labels.dtype)
        host.copy_(found, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        queued = self.calls > SYNC_CHECKS
        self._pending.append((self.calls, host, done, vocab, ignore_index, queued))
        if not queued:
            done.synchronize()
            self.raise_finished()

    def raise_finished(self) -> None:
        """Raise for a check that has finished and found a bad label; forget the finished ones."""
        while self._pending and self._pending[0][2].query():
            call, host, _, vocab, ignore_index, queued = self._pending.pop(0)
            bad, label = bool(host[0]), int(host[1])
            self._free.append(host)
            if bad:
                _raise(label, vocab, ignore_index,
                       f" (in the labels of loss call {call}, checked after it ran)" if queued else "")

    def _pinned(self, dtype: torch.dtype) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.dtype == dtype:
                return self._free.pop(i)
        return torch.empty(2, dtype=dtype, pin_memory=True)


def _first_bad(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """``[any label bad, the first bad label (any label if none is)]``, computed without reading anything back
    (index_select, not ``[tensor]``: indexing with a 0-d tensor reads the index back to the host)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    first = bad.reshape(-1).to(torch.uint8).argmax().reshape(1)
    first_bad = labels.reshape(-1).index_select(0, first).reshape(())
    return torch.stack([bad.any().to(labels.dtype), first_bad])


def _raise(label: int, vocab: int, ignore_index: int, where: str) -> None:
    raise IndexError(f"fused_linear_cross_entropy: label {label} is outside [0, {vocab}) and is not ignore_index "
                     f"({ignore_index}){where}; check the tokenizer's vocab against the LM head")


check_label_range = LabelRangeCheck()
