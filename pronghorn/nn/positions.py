"""Position ids that are known, without looking at them, to hold one whole sequence per row.

Whether a batch is packed (several sequences in one row) is read off ``position_ids``: a new sequence starts
wherever the position does not advance by one. transformers' mask preparation and our varlen attention both
read that answer on the host, which waits for the GPU to finish all the work queued before it and then leaves
it idle while Python queues the next kernels: twice per training step, at the start of the forward pass.

When a training forward gets no ``position_ids``, no attention mask and no cache, the positions are ``0..S-1``
in every row and the answer is known. :func:`one_sequence_positions` makes those position ids and marks them;
both readers skip the look for a marked tensor (and for an ``expand`` of one over the batch, which the mask
preparation makes). Any other position ids are still checked.
"""
from __future__ import annotations

import functools

import torch

_MARK = "_pronghorn_one_sequence_per_row"


def one_sequence_positions(length: int, device) -> torch.Tensor:
    """``[1, length]`` position ids ``0..length-1`` (what a decoder builds when given none), marked."""
    positions = torch.arange(length, device=device)
    setattr(positions, _MARK, True)
    return positions.unsqueeze(0)


def holds_one_sequence_per_row(position_ids: torch.Tensor | None) -> bool:
    """True for position ids from :func:`one_sequence_positions` or an expand of them over rows; False means
    unknown (the caller must look)."""
    if position_ids is None:
        return False
    root = position_ids._base if position_ids._base is not None else position_ids
    if not getattr(root, _MARK, False):
        return False
    # A view that repeats the whole marked row: every leading dim has one entry or stride 0.
    return (position_ids.shape[-1] == root.shape[0] and position_ids.stride(-1) == 1
            and position_ids.storage_offset() == root.storage_offset()
            and all(n == 1 or st == 0 for n, st in zip(position_ids.shape[:-1], position_ids.stride()[:-1])))


def skip_known_packed_checks() -> None:
    """Let transformers' mask preparation skip its packed-sequence look for marked position ids (idempotent).

    Its ``find_packed_sequence_indices`` answers None ("not packed") after reading the mask on the host; for
    marked ids that None is known beforehand. Without that function (other transformers versions) nothing
    changes.
    """
    from transformers import masking_utils

    find = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find is None or getattr(find, "_pronghorn_wrapped", False):
        return

    @functools.wraps(find)
    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        if holds_one_sequence_per_row(position_ids):
            return None
        return find(position_ids, *args, **kwargs)

    find_packed_sequence_indices._pronghorn_wrapped = True
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
