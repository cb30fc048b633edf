"""Where the host's time goes in one training step, measured where the GPU cannot hide it.

At a short sequence (``--seq-len 128``) the GPU finishes each step's kernels long before Python has
issued them, so the step time is the host's time per step: Python, the autograd engine, PyTorch
dispatch and kernel launches. If that is close to the GPU time of the real workload (2 x 2048), the
GPU will sit idle whenever the host falls behind. Writes the step time without the profiler, then a
cProfile of a few steps sorted by cumulative and by own time, and the host cost of one launch of a
small Triton kernel against one small PyTorch op.

    python benchmarks/host_profile.py --config pronghorn --mode qlora --out $OUT/host-qlora.txt \
        --model-dir /dev/shm/pronghorn-bench/llama-3.1-8b

``--ops PATH`` also writes the host time of each phase and one step's operators and kernel launches under
torch.profiler (how many of each, and their own host time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_throughput as tt  # noqa: E402


def launch_costs(device: str, n: int = 2000) -> dict:
    """Host microseconds per call: pronghorn's RMSNorm forward launched through Triton's JIT, the same
    compiled kernel launched directly (what a launch cache could reach), and two small aten ops."""
    from pronghorn.kernels.rms_norm.triton import _rms_norm_fwd_kernel, rms_norm_fwd

    x = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    w = torch.ones(64, device=device, dtype=torch.bfloat16)
    y, rstd = torch.empty_like(x), torch.empty(8, device=device)
    args = (x, w, y, rstd, 64, 64, 64, 1e-6, 0.0)
    consts = dict(CAST_LLAMA=True, INT64=False, BLOCK_N=64, num_warps=2)
    calls = {"triton_jit_rms_norm_fwd": lambda: rms_norm_fwd(x, w, 1e-6, 0.0, True, x.dtype, False),
             "triton_jit_bare_launch": lambda: _rms_norm_fwd_kernel[(8,)](*args, **consts),
             "aten_add": lambda: torch.add(x, x), "aten_mm": lambda: x @ x.t()}
    try:  # Triton 3.6's runner takes the constexpr values too, positionally after the others
        runner = _rms_norm_fwd_kernel[(8,)](*args, **consts)[(8, 1, 1)]
        runner(*args, True, False, 64)
        calls["triton_compiled_runner"] = lambda: runner(*args, True, False, 64)
    except Exception as exc:  # the compiled-kernel API differs between Triton releases
        print("no compiled runner:", repr(exc))
    out = {}
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name + "_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
        torch.cuda.synchronize()
    return out


def op_table(step, batches) -> str:
    """Host milliseconds per phase (synchronizing after each, so a phase's own kernels are not charged to the
    next), then one step under torch.profiler: its operators by call count and by own host time, and how many
    kernels it launched."""
    times: dict = {}

    def mark(name):
        torch.cuda.synchronize()
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - mark.t0
        mark.t0 = now

    for ids in batches:
        torch.cuda.synchronize()
        mark.t0 = time.perf_counter()
        step(ids, mark)
    lines = ["host ms per phase: " + ", ".join(f"{k} {v / len(batches) * 1e3:.1f}" for k, v in times.items())]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(batches[0])
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                         "cudaLaunchKernelExC"))
    lines.append(f"kernel launches in one step: {launches}")
    for sort in ("count", "self_cpu_time_total"):
        lines.append(f"\n--- one step's operators by {sort} ---")
        lines.append(events.table(sort_by=sort, row_limit=70, max_name_column_width=60))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="pronghorn", choices=tt.CONFIGS)
    p.add_argument("--mode", default="bf16", choices=tt.MODES)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profiled-steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--ops", metavar="PATH",
                   help="also write the host time of each phase (forward, backward, optimizer) and one step's "
                        "operators under torch.profiler, by count and by own host time, to PATH")
    args = p.parse_args()
    shape = common.get_shape(args.shape)
    model_dir = Path(args.model_dir or f"/dev/shm/pronghorn-bench/{shape.name}")
    targs = tt.parse_args(["--shape", args.shape, "--config", args.config, "--mode", args.mode, "--out", "/dev/null"])
    loader = {"pronghorn": tt.load_pronghorn, "unsloth": tt.load_unsloth, "liger": tt.load_liger,
              "hf_peft": tt.load_hf_peft}[args.config]
    model = loader(targs, shape, model_dir, args.seq_len) if args.config in ("pronghorn", "unsloth") \
        else loader(targs, shape, model_dir)
    batches = tt.make_batches(shape.config["vocab_size"], 5 + args.steps + args.profiled_steps, shape.batch_size,
                              args.seq_len)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    model.train()

    def step(ids, mark=lambda name: None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids.cuda(non_blocking=True), labels=ids.cuda(non_blocking=True)).loss
        mark("forward")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")

    for i in range(5):
        step(batches[i])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(5, 5 + args.steps):
        step(batches[i])
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    if args.ops:
        Path(args.ops).write_text(op_table(step, batches[5:5 + args.steps]))
    prof = cProfile.Profile()
    prof.enable()
    for i in range(5 + args.steps, 5 + args.steps + args.profiled_steps):
        step(batches[i])
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(50)
    head = (f"{args.config} {args.mode} seq {args.seq_len}: {ms:.1f} ms/step unprofiled (host-bound at this length); "
            f"launch costs {launch_costs('cuda')}; versions {common.package_versions()}\n")
    print(head)
    Path(args.out).write_text(head + text.getvalue())


if __name__ == "__main__":
    main()
