"""CPU check of the vision-language benchmark end to end on the ``tiny`` shape (about 30 s on 2 cores):

    .venv/bin/python -m pytest benchmarks/vision/test_train_vlm.py -q

The suite builds the checkpoint, runs every configuration in its own process and writes the report; a
configuration whose library is missing (Unsloth here) must be recorded as an error, not stop the run.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "train_vlm.py"
ROOT = SCRIPT.parents[2]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm-bench")
    cmd = [sys.executable, str(SCRIPT), "suite", "--shape", "tiny", "--model-dir", str(out / "ckpt"),
           "--out", str(out / "results"), "--configs", "pronghorn,unsloth,hf_peft", "--device", "cpu",
           "--warmup", "1", "--steps", "3", "--budget", "300"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(out)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "results"


def _record(results: Path, config: str) -> dict:
    return json.loads((results / f"{config}.json").read_text())


@pytest.mark.parametrize("config", ["pronghorn", "hf_peft"])
def test_configuration_trains_and_reports_rates(suite_dir, config):
    rec = _record(suite_dir, config)
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["tokens_per_s"] > rec["text_tokens_per_s"] > 0
    assert rec["images_per_s"] > 0
    assert len(rec["step_s"]) == rec["timed_steps"] == 3
    assert len(rec["batch_stats"]) == rec["warmup_steps"] + rec["timed_steps"]
    # Every batch has images and a text-only row; image tokens never carry loss.
    for stats in rec["batch_stats"]:
        assert stats["images"] == 4 and stats["image_tokens"] > 0
        assert stats["label_tokens"] < stats["text_tokens"]
    # LoRA on the language model, the vision blocks and the merger (2 layers each of the tiny towers).
    assert rec["lora_modules"] == {"language": 14, "vision": 10, "merger": 2, "other": 0, "total": 26}
    for key in ("date", "device", "commit", "versions"):
        assert rec[key]


def test_missing_unsloth_is_recorded_as_an_error(suite_dir):
    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is installed here")
    rec = _record(suite_dir, "unsloth")
    assert rec["status"] == "error"
    assert "No module named 'unsloth'" in rec["error"]


def test_report_compares_configurations_on_the_same_batches(suite_dir):
    summary = json.loads((suite_dir / "results.json").read_text())
    check = summary["workload_check"]
    assert check["same_workload"] and check["configs_with_batches"] == ["hf_peft", "pronghorn"]
    assert check["label_tokens_differ"] == []
    by_config = {r["config"]: r for r in summary["records"]}
    # LoRA B starts at zero and the batches are equal, so pronghorn's first loss is the HF model's.
    assert abs(by_config["pronghorn"]["first_loss_minus_hf"]) < 5e-2
    md = (suite_dir / "results.md").read_text()
    for config in ("pronghorn", "hf_peft", "unsloth"):
        assert f"| {config} |" in md
    assert "No module named 'unsloth'" in md
