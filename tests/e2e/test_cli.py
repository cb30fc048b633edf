"""The CLI's default run end to end: embedded model and data, a short training, every output written."""
import json
import subprocess
import sys

import pytest
import yaml

from pronghorn.config.loading import load_config
from pronghorn.config.validation import ConfigError


@pytest.mark.slow
def test_default_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pronghorn", "train", "--max_steps", "30", "--learning_rate", "3e-3",
           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
    assert summary["answers_after"] != summary["answers_before"]
    for name in ("adapter/adapter_config.json", "merged/config.json", "loss_log.jsonl", "loss_curve.png"):
        assert (out / name).exists(), name
    assert "loss" in proc.stdout and "before:" in proc.stdout and "after:" in proc.stdout

    chat = subprocess.run([sys.executable, "-m", "pronghorn", "chat", "--model", str(out / "merged"), "--prompt",
                           "What is the capital of Peru?", "--max_new_tokens", "12"],
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "> What is the capital of Peru?" in chat.stdout


def test_yaml_and_cli_share_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"r": 8, "lora_alpha": 8, "max_steps": 5, "target_modules": "q_proj,v_proj"}))
    config = load_config(path, max_steps=7)
    assert (config.r, config.max_steps, config.target_modules) == (8, 7, ["q_proj", "v_proj"])


def test_embedded_model_gets_its_own_defaults_and_named_models_the_usual_ones(tmp_path):
    demo = load_config()
    assert (demo.max_steps, demo.learning_rate) == (300, 2e-3)
    assert load_config(max_steps=7).max_steps == 7  # what the user gives wins
    named = load_config(model_name=str(tmp_path / "model"))
    assert (named.max_steps, named.learning_rate) == (60, 2e-4)


def test_yaml_unknown_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"Unknown configuration keys \['lora_rank'\]"):
        load_config(path)


def test_cli_rejects_bad_rank(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pronghorn", "train", "--r", "0", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "r (the LoRA rank) must be a positive integer" in proc.stderr


def test_doctor_prints_environment():
    proc = subprocess.run([sys.executable, "-m", "pronghorn", "doctor"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0
    assert "transformers" in proc.stdout and "tested: >=5.0,<6.0" in proc.stdout
