"""Whole-model VLM tests run the kernels' PyTorch references on CPU (the Triton interpreter is far too slow
for models; kernel parity of Triton vs reference lives in tests/kernels). Module scope, so module-scoped
fixtures that train a model see it too."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _reference_kernels_on_cpu():
    if torch.cuda.is_available():
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        yield
