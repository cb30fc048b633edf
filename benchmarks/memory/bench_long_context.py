"""Longest trainable context at batch 1: double, then bisect, the sequence length until out of memory.

Every trial (one length, one configuration) runs in a fresh process, so an out-of-memory error
leaves nothing behind for the next trial. A trial loads the model, creates AdamW's state, runs
``--warmup-steps`` untimed steps (1) and one timed training step (forward + backward + AdamW) on random
tokens, and records tokens/s and peak memory.

Configurations: ``pronghorn`` (offloaded checkpointing, the default ``"unsloth"`` mode),
``pronghorn_tiled`` (the same plus the tiled MLP), ``unsloth``, ``hf_peft`` (non-reentrant
checkpointing, sdpa); modes ``qlora`` (nf4) and ``bf16``. LoRA r=32 on all linear layers.

    python benchmarks/memory/bench_long_context.py --out $OUT/long_context.json \
        --configs pronghorn unsloth hf_peft --modes qlora bf16 --budget-s 450

The search doubles until two lengths have run, then jumps to the length where the straight line through
their peak memories meets the GPU's capacity (at most ``--max-jump`` times the last success); after the
first failure it bisects, probing the interpolated point. At long lengths one trial takes minutes (attention
is quadratic), so a few well-placed probes matter more than many halvings.

``--attn-priority cudnn`` puts sdpa's cuDNN backend first for every configuration (it needs the same
memory as the flash backend and is ~1.7x faster at 64K tokens), to shorten long trials; the record says so.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402

CONFIGS = ["pronghorn", "pronghorn_tiled", "unsloth", "hf_peft"]


def _record_progress(rec: dict, out: Path, device: str, every_s: float = 15.0) -> threading.Event:
    """Rewrite the trial's record every ``every_s`` seconds with the elapsed time and the peak GPU memory
    so far, so a trial killed by its timeout still says how far it got; set the returned event to stop."""
    stop, t0 = threading.Event(), time.perf_counter()

    def loop():
        while not stop.wait(every_s):
            snapshot = dict(rec)  # the trial may update ``rec`` meanwhile
            if snapshot.get("status") == "started":
                _shared.common.write_json(out, snapshot | {"elapsed_s": time.perf_counter() - t0,
                                                           "peak_gib_so_far": _shared.common.peak_gib(device)})

    threading.Thread(target=loop, daemon=True).start()
    return stop


def trial(args) -> dict:
    """One length, one configuration, in this process."""
    shape = _shared.common.get_shape(args.shape)
    rec = _shared.common.envelope(benchmark="long_context_trial", config=args.config, mode=args.mode, seq_len=args.seq,
                                  attn_priority=args.attn_priority, status="started")
    _shared.common.write_json(args.out, rec)
    progress = _record_progress(rec, args.out, args.device)
    try:
        framework = "pronghorn" if args.config.startswith("pronghorn") else args.config
        model = _shared.load(framework, args.mode, Path(args.model_dir), args.seq, args.device)
        if args.config == "pronghorn_tiled":
            from pronghorn.memory.tiled_mlp import enable_tiled_mlp

            rec["tiled_mlp_tile_tokens"] = enable_tiled_mlp(model).tile_tokens
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, shape.config["vocab_size"], (1, args.seq), generator=g).to(args.device)
        dev_type = "cuda" if args.device.startswith("cuda") else "cpu"
        model.train()

        def step():
            # The priority covers backward too: checkpoint recomputes must pick the forward's backend.
            with _attention_priority(args.attn_priority):
                with torch.autocast(dev_type, dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # AdamW's state (two fp32 moments per LoRA weight) exists from the first step on: make it now, with
        # zero gradients and no weight decay, so even a single timed step peaks with it in memory.
        for p in params:
            p.grad = torch.zeros_like(p)
        wd = [grp["weight_decay"] for grp in opt.param_groups]
        for grp in opt.param_groups:
            grp["weight_decay"] = 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        for grp, w in zip(opt.param_groups, wd):
            grp["weight_decay"] = w
        for _ in range(args.warmup_steps):
            step()
        _shared.common.sync(args.device)
        t0 = time.perf_counter()
        step()
        _shared.common.sync(args.device)
        dt = time.perf_counter() - t0
        rec.update(status="ok", step_s=dt, tokens_per_s=args.seq / dt, warmup_steps=args.warmup_steps,
                   peak_gib=_shared.common.peak_gib(args.device))
    except Exception as e:  # an OOM is the expected end of the search
        rec.update(_shared.common.failure_fields(e))
    progress.set()
    _shared.common.write_json(args.out, rec)
    return rec


def _attention_priority(name: str):
    """sdpa's backend order for the trial: the library default, or cuDNN first."""
    from contextlib import nullcontext

    if name == "default":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _capacity_gib(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1] / 2**30
    return float("inf")


def next_probe(oks: list[tuple[int, float]], ok: int, bad: int | None, capacity_gib: float, max_jump: float,
               resolution: int) -> int:
    """The next length to try, from the successful (length, peak GiB) pairs so far.

    The line through the last two successes' peaks says where 97% of capacity is reached; without it,
    double (no failure yet) or halve the gap (after one). The probe stays at least ``resolution`` past the
    last success, below ``max_jump`` times it, and ``resolution`` short of the first failure."""
    fit = None
    if len(oks) >= 2:
        (l0, p0), (l1, p1) = oks[-2], oks[-1]
        if l1 != l0 and p1 > p0:
            fit = int(l1 + (0.97 * capacity_gib - p1) * (l1 - l0) / (p1 - p0))
    if bad is None:
        target, hi = (fit or ok * 2), int(ok * max_jump)
    else:
        target, hi = (fit or (ok + bad) // 2), bad - resolution
    return max(ok + resolution, min(target, hi)) // 256 * 256


def search(args, config: str, mode: str, model_dir: Path) -> dict:
    """Grow from ``--start`` until a trial fails, then narrow the gap to ``--resolution`` (or 1/16 of the
    longest success), within ``--budget-s``; see ``next_probe``."""
    t_start = time.perf_counter()
    trials, ok, bad = [], None, None

    def run(seq: int) -> bool:
        out = args.out.with_name(f"{args.out.stem}.{config}.{mode}.{seq}.json")
        out.unlink(missing_ok=True)
        left = args.budget_s - (time.perf_counter() - t_start)
        argv = [__file__, "--trial", "--config", config, "--mode", mode, "--seq", str(seq), "--out", str(out),
                "--shape", args.shape, "--model-dir", str(model_dir), "--device", args.device,
                "--warmup-steps", str(args.warmup_steps), "--attn-priority", args.attn_priority]
        rec = _shared.run_child(argv, out, max(30.0, min(args.trial_timeout_s, left)))
        trials.append({k: rec.get(k) for k in ("seq_len", "status", "tokens_per_s", "peak_gib", "step_s",
                                               "wall_s", "process", "error")} | {"seq_len": seq})
        print(f"  {config}/{mode} seq={seq}: {rec.get('status')} {rec.get('tokens_per_s')}", flush=True)
        return rec.get("status") == "ok"

    oks, capacity = [], _capacity_gib(args.device)
    seq = args.start
    while time.perf_counter() - t_start < args.budget_s:
        if run(seq):
            ok = seq
            oks.append((seq, trials[-1]["peak_gib"] or 0.0))
        else:
            bad = seq
        if ok is None or ok >= args.max_seq or (bad is not None and bad - ok <= max(args.resolution, ok // 16)):
            break
        seq = min(next_probe(oks, ok, bad, capacity, args.max_jump, args.resolution), args.max_seq)
    best = next((t for t in trials if t["seq_len"] == ok and t["status"] == "ok"), None)
    return dict(config=config, mode=mode, max_seq_len=ok, first_failing_seq_len=bad,
                tokens_per_s_at_max=best and best["tokens_per_s"], peak_gib_at_max=best and best["peak_gib"],
                budget_exhausted=time.perf_counter() - t_start >= args.budget_s, trials=trials)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", action="store_true", help="internal: run one trial in this process")
    p.add_argument("--config", choices=CONFIGS)
    p.add_argument("--configs", nargs="+", default=["pronghorn", "unsloth", "hf_peft"])
    p.add_argument("--modes", nargs="+", default=["qlora", "bf16"], choices=["qlora", "bf16"])
    p.add_argument("--mode", choices=["qlora", "bf16"])
    p.add_argument("--seq", type=int)
    _shared.add_run_args(p)
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--max-seq", type=int, default=393216)
    p.add_argument("--max-jump", type=float, default=8.0, help="largest factor a memory-guided probe grows by")
    p.add_argument("--attn-priority", choices=["default", "cudnn"], default="default")
    p.add_argument("--resolution", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=450, help="per configuration and mode (all its trials)")
    p.add_argument("--trial-timeout-s", type=float, default=240)
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="untimed steps before the timed one (0 at the longest lengths, where a step takes minutes; "
                        "the first step's tokens/s then includes one-time kernel compilation)")
    args = p.parse_args(argv)
    if args.trial:
        rec = trial(args)
        print(json.dumps({k: rec.get(k) for k in ("status", "tokens_per_s", "peak_gib", "error")}))
        return 0
    model_dir = _shared.ensure_checkpoint(args.shape, args.model_dir)
    results = []
    for mode in args.modes:
        for config in args.configs:
            results.append(search(args, config, mode, model_dir))
            _shared.common.write_json(args.out, _shared.common.envelope(benchmark="long_context", shape=args.shape,
                                                                 batch_size=1, results=results))
    for r in results:
        print(f"{r['config']:16s} {r['mode']:5s} max_seq_len={r['max_seq_len']} tokens/s={r['tokens_per_s_at_max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
