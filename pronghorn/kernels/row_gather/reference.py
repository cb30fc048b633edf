"""Plain PyTorch reference for the row gather: an embedding lookup on the table's device, then a copy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_rows_reference(table: torch.Tensor, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table[ids]`` on ``device``; ids outside ``[0, rows)`` raise (as :func:`torch.nn.functional.embedding`)."""
    return F.embedding(ids.to(table.device), table).to(device)
