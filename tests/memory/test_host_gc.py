"""The loaders freeze the objects alive before a model is built, so full collections skip them."""
import gc

from pronghorn.memory.host_gc import freeze_preexisting_objects


def test_freeze_moves_live_objects_out_of_collection_and_model_stays_collectable(monkeypatch):
    monkeypatch.delenv("PRONGHORN_GC_FREEZE", raising=False)
    try:
        assert freeze_preexisting_objects()
        frozen = gc.get_freeze_count()
        assert frozen > 0

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle created after the freeze, like a patched model
        alive = [a]
        del a, b
        alive.clear()
        assert gc.collect() >= 2, "objects created after the freeze must still be collected"
    finally:
        gc.unfreeze()


def test_opt_out(monkeypatch):
    monkeypatch.setenv("PRONGHORN_GC_FREEZE", "0")
    before = gc.get_freeze_count()
    assert not freeze_preexisting_objects()
    assert gc.get_freeze_count() == before
