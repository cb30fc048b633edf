"""A/B of run-time settings of pronghorn in one process: step time, peak memory, host and GPU time per phase.

Loads the model once, warms it up, then times every setting in interleaved rounds, so drift of the machine
(clocks, a busy host) is shared by all of them; comparisons across processes or machines are much noisier
than the differences these settings make. Settings (``--settings``, comma-separated):

* ``leadN``: at most N layer inputs wait for their copy to the host (:func:`pronghorn.memory.offload.set_copy_lead`,
  default ``DEFAULT_COPY_LEAD``): how many layers of work the host may queue ahead of the GPU in the forward pass.
* ``blas-cublas`` / ``blas-cublaslt``: the BLAS library PyTorch prefers for its GEMMs.
* ``residual``: park each layer's post-attention residual in host memory, so the recompute skips o_proj
  (:func:`pronghorn.memory.stash.set_residual_stash`).
* ``stashN``: park the MLP gate output of the first N layers; ``stashA-B``: of layers A to B-1; ``stashauto``: of
  every ungraphed layer (:func:`pronghorn.memory.stash.set_stashed_layers`). ``lateN``: layers below N bring a
  parked gate back only after the next layer's MLP backward. ``flightN``: park while up to N gates' worth of
  bytes are still on their way (:data:`pronghorn.memory.stash.IN_FLIGHT`).
* ``graphs`` / ``eager``: replay every checkpointed layer as a CUDA graph / none
  (:mod:`pronghorn.memory.layer_graphs`; by default only layers holding 4-bit weights, without eager attention).
  Peak memory adds the graphs' pool, which the allocator's peak does not count (replays allocate nothing).
  ``graphs-ceN``: graphs, and N token rows per cross-entropy chunk.
* ``unchunked`` / ``chunked``: the MLP never / always (also run eagerly) runs in chunks of its intermediate
  dimension, in a forward without autograd and in a recompute's backward (:mod:`pronghorn.kernels.lora.mlp_chunked`;
  by default only inside a CUDA graph); ``mlpchunkN`` / ``fwdchunkN``: N MiB per chunk of backward / forward.
* ``keepN``: N MiB of 4-bit weights per layer handed from recompute to backward
  (:data:`pronghorn.kernels.dequant.handoff.KEEP_BYTES`).

Settings join with ``+`` (``graphs+unchunked``). After each switch ``--settle`` untimed steps run first (graphs
are captured there).

    python benchmarks/inprocess_ab.py --mode bf16 --settings lead2,lead8 --rounds 2 --steps 10 --out $OUT/ab.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_throughput as tt  # noqa: E402


def _phase_times(marks) -> dict:
    """Host and GPU milliseconds of each phase of one step. A phase whose host time is at least its GPU time
    kept the GPU waiting on Python (the host can only fall behind there, not get ahead)."""
    out = {}
    for name, (t0, e0), (t1, e1) in zip(("forward", "backward", "optimizer"), marks, marks[1:]):
        out[name] = {"host": (t1 - t0) * 1e3, "gpu": e0.elapsed_time(e1)}
    return out


# the library's defaults, read before the first setting changes them
DEFAULT_MLP_CHUNK_BYTES = DEFAULT_FORWARD_CHUNK_BYTES = DEFAULT_KEEP_BYTES = DEFAULT_GRAPHS = DEFAULT_IN_FLIGHT = None


def apply_setting(name: str) -> None:
    """Put every knob back to its default, then set the ones ``name`` names (several joined by ``+``)."""
    from pronghorn.kernels.cross_entropy import set_default_chunk_rows
    from pronghorn.kernels.dequant import handoff
    from pronghorn.kernels.lora import mlp_chunked
    from pronghorn.memory import layer_graphs, stash
    from pronghorn.memory.layer_graphs import set_layer_graphs
    from pronghorn.memory.offload import DEFAULT_COPY_LEAD, set_copy_lead
    from pronghorn.memory.stash import set_residual_stash, set_stashed_layers

    global DEFAULT_MLP_CHUNK_BYTES, DEFAULT_FORWARD_CHUNK_BYTES, DEFAULT_KEEP_BYTES, DEFAULT_GRAPHS
    global DEFAULT_IN_FLIGHT
    if DEFAULT_MLP_CHUNK_BYTES is None:
        DEFAULT_GRAPHS, DEFAULT_IN_FLIGHT = layer_graphs._config["mode"], stash.IN_FLIGHT
        DEFAULT_MLP_CHUNK_BYTES, DEFAULT_KEEP_BYTES = mlp_chunked.CHUNK_BYTES, handoff.KEEP_BYTES
        DEFAULT_FORWARD_CHUNK_BYTES = mlp_chunked.FORWARD_CHUNK_BYTES
    handoff.KEEP_BYTES = DEFAULT_KEEP_BYTES
    set_copy_lead(DEFAULT_COPY_LEAD)
    torch.backends.cuda.preferred_blas_library("default")
    set_residual_stash(False)
    stash.IN_FLIGHT = DEFAULT_IN_FLIGHT
    mlp_chunked.set_chunked_mlp("capture")
    mlp_chunked.CHUNK_BYTES = DEFAULT_MLP_CHUNK_BYTES
    mlp_chunked.FORWARD_CHUNK_BYTES = DEFAULT_FORWARD_CHUNK_BYTES
    set_layer_graphs(DEFAULT_GRAPHS)
    set_default_chunk_rows(None)
    stashed, late = (0, 0), 0
    for part in name.split("+"):
        if part.startswith("graphs"):
            set_layer_graphs(True)
            if part.startswith("graphs-ce"):
                set_default_chunk_rows(int(part[9:]))
            elif part != "graphs":
                raise ValueError(f"unknown setting {part!r}: graphs or graphs-ceN")
        elif part == "eager":
            set_layer_graphs(False)
        elif part.startswith("lead"):
            set_copy_lead(int(part[4:]))
        elif part.startswith("blas-"):
            torch.backends.cuda.preferred_blas_library(part[5:])
        elif part == "residual":
            set_residual_stash(True)
        elif part.startswith("stash"):
            first, _, end = part[5:].rpartition("-")
            stashed = ("auto", 0) if end == "auto" else (int(end) - int(first or 0), int(first or 0))
        elif part.startswith("late"):
            late = int(part[4:])
        elif part.startswith("flight"):
            stash.IN_FLIGHT = int(part[6:])
        elif part in ("unchunked", "chunked"):
            mlp_chunked.set_chunked_mlp("never" if part == "unchunked" else "always")
        elif part.startswith("keep"):
            handoff.KEEP_BYTES = int(part[4:]) * 2**20
        elif part.startswith("mlpchunk"):
            mlp_chunked.CHUNK_BYTES = int(part[8:]) * 2**20
        elif part.startswith("fwdchunk"):
            mlp_chunked.FORWARD_CHUNK_BYTES = int(part[8:]) * 2**20
        elif part != "default":
            raise ValueError(f"unknown setting {part!r}: expected leadN, blas-cublas, blas-cublaslt, residual, "
                             "stashN, stashA-B, stashauto, lateN, flightN, graphs, eager, graphs-ceN, unchunked, "
                             "chunked, mlpchunkN, fwdchunkN, keepN or default (joined by +)")
    set_stashed_layers(*stashed, late_layers=late)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="bf16", choices=tt.MODES)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir")
    p.add_argument("--settings", default="default,lead8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--settle", type=int, default=2, help="untimed steps after each switch of setting")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    shape = common.get_shape(args.shape)
    model_dir = Path(args.model_dir or f"/dev/shm/pronghorn-bench/{shape.name}")
    targs = tt.parse_args(["--shape", args.shape, "--config", "pronghorn", "--mode", args.mode, "--out", "/dev/null"])
    settings = args.settings.split(",")
    for name in settings:
        apply_setting(name)  # an unknown name fails here, before the model loads
    model = tt.load_pronghorn(targs, shape, model_dir, shape.seq_len)
    from pronghorn.memory import stash
    from pronghorn.memory.layer_graphs import pool_bytes
    n = args.warmup + args.rounds * len(settings) * (args.settle + args.steps)
    batches = tt.make_batches(shape.config["vocab_size"], n, shape.batch_size, shape.seq_len).pin_memory()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    model.train()

    marks, recording = [], [False]  # (host time, CUDA event) before each recorded step and after its phases

    def mark():
        if recording[0]:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((time.perf_counter(), event))

    step = tt.make_step(model, opt, "cuda", mark=mark)

    batch = iter(batches)
    for _ in range(args.warmup):
        step(next(batch))
    runs = {setting: {"step_ms": [], "peak_gib": [], "host_issue_ms": [], "phases_ms": []} for setting in settings}
    for _ in range(args.rounds):
        for setting in settings:
            apply_setting(setting)
            for _ in range(args.settle):
                step(next(batch))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            stash.STATS.clear()
            timer = common.Timer("cuda")
            timer.mark()
            t0 = time.perf_counter()
            recording[0] = True
            for _ in range(args.steps):
                step(next(batch))
                timer.mark()
            recording[0] = False
            issue = time.perf_counter() - t0
            runs[setting]["step_ms"] += [s * 1e3 for s in timer.step_seconds()]
            pool = pool_bytes() or 0
            runs[setting]["peak_gib"].append((torch.cuda.max_memory_allocated() + pool) / 2**30)
            runs[setting].setdefault("graph_pool_gib", []).append(pool / 2**30)
            runs[setting]["host_issue_ms"].append(issue / args.steps * 1e3)
            runs[setting].setdefault("stash_parked_skipped", []).append(
                {name: [c["parked"], c["skipped"]] for name, c in stash.STATS.items()})
            runs[setting]["phases_ms"] += [_phase_times(marks[i:i + 4]) for i in range(0, len(marks), 4)]
            marks.clear()
    summary = {setting: {"median_ms": statistics.median(r["step_ms"]), "mean_ms": statistics.fmean(r["step_ms"]),
                      "min_ms": min(r["step_ms"]), "max_ms": max(r["step_ms"]), "peak_gib": max(r["peak_gib"]),
                      "graph_pool_gib": max(r.get("graph_pool_gib", [0])),
                      "stash_parked_skipped": r["stash_parked_skipped"][-1],
                      **{f"{phase}_{side}_median_ms": statistics.median(p[phase][side] for p in r["phases_ms"])
                         for phase in ("forward", "backward", "optimizer") for side in ("host", "gpu")}}
               for setting, r in runs.items()}
    record = {"mode": args.mode, "shape": args.shape, "commit": args.commit, "gpu": torch.cuda.get_device_name(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": common.package_versions(),
              "workload": f"{shape.batch_size}x{shape.seq_len}, LoRA r=32 all linear, offloaded checkpointing",
              "rounds": args.rounds, "steps_per_round": args.steps, "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(record, indent=1))
    for setting, s in summary.items():
        print(f"{args.mode} {setting}: median {s['median_ms']:.1f} ms, mean {s['mean_ms']:.1f}, "
              f"range {s['min_ms']:.0f}-{s['max_ms']:.0f}, peak {s['peak_gib']:.2f} GiB (graph pool {s['graph_pool_gib']:.2f}); host/GPU ms forward "
              f"{s['forward_host_median_ms']:.0f}/{s['forward_gpu_median_ms']:.0f}, backward "
              f"{s['backward_host_median_ms']:.0f}/{s['backward_gpu_median_ms']:.0f}, optimizer "
              f"{s['optimizer_host_median_ms']:.1f}/{s['optimizer_gpu_median_ms']:.1f}; stash parked/skipped "
              f"{s['stash_parked_skipped']}")


if __name__ == "__main__":
    main()
