"""Rows of an embedding table gathered into a device tensor, where the table may sit in pinned host memory."""
from pronghorn.kernels.row_gather.function import gather_rows

__all__ = ["gather_rows"]
