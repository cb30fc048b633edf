"""Host cost of one kernel launch at each stage of a training process: does something make every launch dearer?

``benchmarks/host_profile.py`` measured an aten add at 10-11 us and a kept Triton launch at 12-14 us in pronghorn's
process, but 6.4 and 8.0 us in Unsloth's on the same machine. This prints the same launch costs (see
:func:`host_profile.launch_costs`) in a fresh process, after importing the library, after loading and patching the
model, after training steps and after a pause, with the process's thread settings at each point.

    python benchmarks/launch_cost_probe.py --config pronghorn --out $OUT/probe-pronghorn.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def process_facts() -> dict:
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "affinity": len(os.sched_getaffinity(0)), "python_threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")), "profile_hook": repr(sys.getprofile()),
            "trace_hook": repr(sys.gettrace()), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "busy_os_threads": _busy_threads()}


def _busy_threads(window: float = 0.2) -> list:
    """OS threads of this process that used more than 20% of a core over ``window`` seconds (name, share)."""
    def ticks():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
                out[tid] = (name, int(fields[11]) + int(fields[12]))
            except OSError:
                pass
        return out

    before = ticks()
    time.sleep(window)
    after = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for tid, (name, t) in after.items():
        share = (t - before.get(tid, (name, t))[1]) / hz / window
        if share > 0.2:
            busy.append((name, round(share, 2)))
    return busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pronghorn", choices=["pronghorn", "unsloth", "none"])
    p.add_argument("--mode", default="bf16")
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.config == "unsloth":
        import unsloth  # noqa: F401  (first, as Unsloth requires)
    import common
    import host_profile
    import train_throughput as tt

    torch.zeros(1, device="cuda")
    stages = {}

    def stage(name):
        torch.cuda.synchronize()
        stages[name] = {"launch_us": host_profile.launch_costs("cuda"), **process_facts()}
        print(name, stages[name], flush=True)

    stage("before loading a model")
    if args.config != "none":
        shape = common.get_shape(args.shape)
        model_dir = Path(f"/dev/shm/pronghorn-bench/{shape.name}")
        targs = tt.parse_args(["--shape", args.shape, "--config", args.config, "--mode", args.mode, "--out", "/dev/null"])
        loader = tt.load_pronghorn if args.config == "pronghorn" else tt.load_unsloth
        model = loader(targs, shape, model_dir, 128)
        stage("after loading and patching")
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
        ids = torch.randint(0, shape.config["vocab_size"], (2, 128), device="cuda")
        step = tt.make_step(model, opt, "cuda")
        for _ in range(args.steps):
            step(ids)
        stage("after training steps")
        time.sleep(2)
        stage("after a 2 s pause")
    Path(args.out).write_text(json.dumps({"config": args.config, "stages": stages}, indent=1))


if __name__ == "__main__":
    main()
