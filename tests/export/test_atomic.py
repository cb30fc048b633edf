"""Exports never leave half-written targets, never overwrite silently, and check disk space first."""
import shutil
from collections import namedtuple

import pytest

from pronghorn.export.atomic import ExportError, atomic_output_dir, parse_size
from pronghorn.export.save import save_pretrained_merged
from tests.export.helpers import lora_model, tokenizer_for


def test_success_renames_into_place(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing_and_keeps_old_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_empty_target_needs_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("1")
    with pytest.raises(ExportError, match="overwrite=True"), atomic_output_dir(target):
        pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["y"]


def test_empty_existing_target_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("")
    assert (tmp_path / "out" / "f").exists()


def test_disk_space_checked_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    model = lora_model("llama")
    with pytest.raises(ExportError, match=r"not enough disk space.*needs about .*MiB.*has 1000 B free"):
        save_pretrained_merged(model, tmp_path / "m", tokenizer_for(model))
    assert list(tmp_path.iterdir()) == []


def test_merged_export_refuses_existing_dir(tmp_path):
    model = lora_model("llama")
    out = tmp_path / "m"
    save_pretrained_merged(model, out, tokenizer_for(model))
    with pytest.raises(ExportError, match="already exists"):
        save_pretrained_merged(model, out, tokenizer_for(model))
    save_pretrained_merged(model, out, tokenizer_for(model), overwrite=True)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
