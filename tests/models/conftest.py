"""Whole-model tests: the kernels' PyTorch references on CPU (see tests/reference_kernels.py)."""
from tests.reference_kernels import reference_kernels_on_cpu  # noqa: F401  (autouse fixture)
