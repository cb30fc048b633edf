"""Whole-model tests run the kernels' PyTorch references on CPU (the Triton interpreter is slow for
models); tests marked ``interpreted`` keep the Triton kernels, run by the interpreter, inside the model.
Kernel-level parity of Triton vs reference is covered in tests/kernels."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _reference_kernels_on_cpu(request, monkeypatch):
    if not torch.cuda.is_available() and "interpreted" not in request.keywords:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
