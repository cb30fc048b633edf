"""Whole-model tests run the kernels' PyTorch references on CPU (the Triton interpreter is slow for
models); tests marked ``interpreted`` keep the Triton kernels, run by the interpreter, inside the model.
Kernel-level parity of Triton vs reference is covered in tests/kernels.

A suite opts in by importing the fixture into its ``conftest.py``.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def reference_kernels_on_cpu(request, monkeypatch):
    """Switch the interpreter off for this test on a CPU-only machine, unless it is marked ``interpreted``."""
    if not torch.cuda.is_available() and "interpreted" not in request.keywords:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
