"""Loaded models are frozen out of Python's cyclic garbage collection (pronghorn.models.gc_freeze)."""
import gc

import pytest

from pronghorn.models import gc_freeze


@pytest.fixture
def unfreeze():
    yield
    gc.unfreeze()


def test_freeze_moves_live_objects_out_of_collections(monkeypatch, unfreeze):
    monkeypatch.setenv("PRONGHORN_GC_FREEZE", "1")
    gc.unfreeze()
    kept = [[i] for i in range(1000)]  # lists are tracked by the collector
    assert gc_freeze.freeze_long_lived_objects()
    assert gc.get_freeze_count() >= len(kept)
    gc.unfreeze()
    monkeypatch.setenv("PRONGHORN_GC_FREEZE", "0")
    assert not gc_freeze.freeze_long_lived_objects() and gc.get_freeze_count() == 0


def test_get_peft_model_freezes_unless_turned_off(monkeypatch, tmp_path, unfreeze):
    from pronghorn import FastLanguageModel
    from tests.factories import save_tiny

    path = save_tiny("llama", tmp_path / "llama")
    for setting, frozen in (("0", False), ("1", True)):
        monkeypatch.setenv("PRONGHORN_GC_FREEZE", setting)
        gc.unfreeze()
        model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=32)
        FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear")
        assert (gc.get_freeze_count() > 0) is frozen
