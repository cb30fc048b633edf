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
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402

CONFIGS = ["pronghorn", "pronghorn_tiled", "unsloth", "hf_peft"]


def trial(args) -> dict:
    """One length, one configuration, in this process."""
    shape = _shared.common.get_shape(args.shape)
    rec = _shared.common.envelope(benchmark="long_context_trial", config=args.config, mode=args.mode, seq_len=args.seq,
                           status="started")
    _shared.common.write_json(args.out, rec)
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
    _shared.common.write_json(args.out, rec)
    return rec


def search(args, config: str, mode: str, model_dir: Path) -> dict:
    """Double from ``--start`` until a trial fails, then bisect to ``--resolution``, within ``--budget-s``."""
    t_start = time.perf_counter()
    trials, ok, bad = [], None, None

    def run(seq: int) -> bool:
        out = args.out.with_name(f"{args.out.stem}.{config}.{mode}.{seq}.json")
        out.unlink(missing_ok=True)
        left = args.budget_s - (time.perf_counter() - t_start)
        argv = [__file__, "--trial", "--config", config, "--mode", mode, "--seq", str(seq), "--out", str(out),
                "--shape", args.shape, "--model-dir", str(model_dir), "--device", args.device,
                "--warmup-steps", str(args.warmup_steps)]
        rec = _shared.run_child(argv, out, max(30.0, min(args.trial_timeout_s, left)))
        trials.append({k: rec.get(k) for k in ("seq_len", "status", "tokens_per_s", "peak_gib", "step_s",
                                               "wall_s", "process", "error")} | {"seq_len": seq})
        print(f"  {config}/{mode} seq={seq}: {rec.get('status')} {rec.get('tokens_per_s')}", flush=True)
        return rec.get("status") == "ok"

    seq = args.start
    while seq <= args.max_seq and time.perf_counter() - t_start < args.budget_s:
        if run(seq):
            ok, seq = seq, seq * 2
        else:
            bad = seq
            break
    while ok is not None and bad is not None and bad - ok > max(args.resolution, ok // 16) \
            and time.perf_counter() - t_start < args.budget_s:
        mid = (ok + bad) // 2 // 256 * 256
        if run(mid):
            ok = mid
        else:
            bad = mid
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
    p.add_argument("--max-seq", type=int, default=262144)
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
