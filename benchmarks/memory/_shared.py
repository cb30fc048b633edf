"""Pieces shared by the memory benchmarks: loaders (reused from ``benchmarks/train_throughput.py``),
the checkpoint on /dev/shm, and a subprocess runner that turns an out-of-memory crash into a record.
Timing, peak memory and the result envelope come from ``benchmarks/common.py`` (``_shared.common``).

Importing this module imports torch and the standard library only: Unsloth must be imported
before transformers in its own process, so transformers is imported inside the loaders.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))
import common  # noqa: E402  (benchmarks/ is a folder of scripts)
import train_throughput  # noqa: E402

for _k, _v in common.OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


def ensure_checkpoint(shape_name: str, model_dir: str | None) -> Path:
    """The random-init checkpoint of ``shape_name`` (built once, on GPU when present)."""
    shape = common.get_shape(shape_name)
    path = Path(model_dir or f"/dev/shm/pronghorn-bench/{shape.name}")
    if not common.checkpoint_is_current(shape, path):
        print(f"building {shape.name} checkpoint at {path}", flush=True)
        common.build_checkpoint(shape, path)
    return path


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options every memory benchmark takes: --out, --shape, --model-dir, --device."""
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load(config: str, mode: str, model_dir: Path, seq_len: int, device: str, gc: str = "unsloth", attn="sdpa"):
    """A PEFT LoRA r=32 model from one of the framework loaders of ``train_throughput``."""
    # pronghorn's experimental stashes stay off, as in train_throughput's defaults
    args = argparse.Namespace(mode=mode, attn=attn, device=device, rank=32, alpha=32, gc=gc, stash_mlp_layers=0,
                              stash_residual=0)
    shape = None
    if config == "hf_peft":
        return train_throughput.load_hf_peft(args, shape, model_dir)
    if config == "unsloth":
        return train_throughput.load_unsloth(args, shape, model_dir, seq_len)
    if config == "pronghorn":
        return train_throughput.load_pronghorn(args, shape, model_dir, seq_len)
    raise ValueError(f"unknown framework {config!r}; use hf_peft, unsloth or pronghorn")


def run_child(argv: list[str], out_json: Path, timeout_s: float) -> dict:
    """Run ``python argv`` in a fresh process; return the JSON it wrote, or why it wrote none."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout_s)
        status, tail = ("exit %d" % proc.returncode), (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status = f"timeout after {timeout_s:.0f}s"
        tail = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace")[-3000:] if isinstance(
            e.stdout, bytes) else str(e)[-3000:]
    wall = time.perf_counter() - t0
    if out_json.is_file():
        record = json.loads(out_json.read_text())
        record.setdefault("process", status)
    else:
        oom = "out of memory" in tail.lower() or "outofmemory" in tail.lower()
        record = {"status": "oom" if oom else "failed", "process": status, "log_tail": tail}
    record["wall_s"] = wall
    return record
