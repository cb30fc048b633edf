"""Offloaded vs on-GPU gradient checkpointing: peak memory and step time at 16K and 64K tokens.

transformers + PEFT LoRA r=32 (bf16 weights, sdpa) with pronghorn's checkpointing installed by
``enable_gradient_checkpointing(model, "gpu" | "offload")``; nothing else of pronghorn, so the
difference is the checkpointing policy alone. The loss is computed in 4096-token chunks of the LM
head under checkpointing, so the ``[tokens, vocab]`` logits (32 GB at 64K for a 128K vocabulary)
do not hide the activation memory being measured. Each (mode, length) runs in its own process.

    python benchmarks/memory/bench_offload.py --out $OUT/offload.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, ids: torch.Tensor, chunk: int = 4096):
    """Mean next-token cross-entropy without materialising all logits at once."""
    h, y = hidden[0, :-1], ids[0, 1:]

    def piece(hc, yc):
        return F.cross_entropy(lm_head(hc).float(), yc, reduction="sum")

    total = sum(torch.utils.checkpoint.checkpoint(piece, hc, yc, use_reentrant=False)
                for hc, yc in zip(h.split(chunk), y.split(chunk)))
    return total / y.numel()


def trial(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pronghorn.memory import enable_gradient_checkpointing

    shape = _shared.common.get_shape(args.shape)
    rec = _shared.common.envelope(benchmark="offload_trial", checkpointing=args.mode, seq_len=args.seq, status="started")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     device_map={"": args.device})
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=list(_shared.common.TARGET_MODULES)))
        enable_gradient_checkpointing(model, args.mode)
        base = model.get_base_model()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
        ids = torch.randint(3, shape.config["vocab_size"], (1, args.seq),
                            generator=torch.Generator().manual_seed(0)).to(args.device)
        model.train()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            rec["weights_gib"] = torch.cuda.memory_allocated() / 2**30

        def step():
            hidden = base.model(input_ids=ids, use_cache=False).last_hidden_state
            chunked_lm_loss(hidden, base.lm_head, ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        _shared.common.sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            _shared.common.sync(args.device)
            times.append(time.perf_counter() - t0)
        cfg = base.config
        rec.update(status="ok", step_s=min(times), step_s_all=times, tokens_per_s=args.seq / min(times),
                   peak_gib=_shared.common.peak_gib(args.device),
                   layer_inputs_gib=cfg.num_hidden_layers * args.seq * cfg.hidden_size * 2 / 2**30)
    except Exception as e:
        rec.update(_shared.common.failure_fields(e))
    _shared.common.write_json(args.out, rec)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", action="store_true", help="internal: one (mode, length) in this process")
    p.add_argument("--mode", choices=["gpu", "offload"])
    p.add_argument("--seq", type=int)
    p.add_argument("--modes", nargs="+", default=["gpu", "offload"])
    p.add_argument("--seqs", nargs="+", type=int, default=[16384, 65536])
    p.add_argument("--steps", type=int, default=2)
    _shared.add_run_args(p)
    p.add_argument("--timeout-s", type=float, default=300)
    args = p.parse_args(argv)
    if args.trial:
        rec = trial(args)
        print(json.dumps({k: rec.get(k) for k in ("status", "peak_gib", "step_s", "error")}))
        return 0
    model_dir = _shared.ensure_checkpoint(args.shape, args.model_dir)
    results = []
    for seq in args.seqs:
        for mode in args.modes:
            out = args.out.with_name(f"{args.out.stem}.{mode}.{seq}.json")
            out.unlink(missing_ok=True)
            argv = [__file__, "--trial", "--mode", mode, "--seq", str(seq), "--steps", str(args.steps), "--out",
                    str(out), "--shape", args.shape, "--model-dir", str(model_dir), "--device", args.device]
            rec = _shared.run_child(argv, out, args.timeout_s)
            rec.update(checkpointing=mode, seq_len=seq)
            results.append(rec)
            print(json.dumps({k: rec.get(k) for k in ("checkpointing", "seq_len", "status", "peak_gib", "step_s")}),
                  flush=True)
            _shared.common.write_json(args.out, _shared.common.envelope(benchmark="offload", shape=args.shape,
                                                                 results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
