"""Training throughput on instruction-tuning lengths: real (non-pad) tokens per second and epoch time.

Examples have lengths drawn from ``length_histogram.json`` (a synthetic histogram: read its
``source`` field), truncated to ``--max-seq-length`` (2048), batch 8. Configurations, each in
its own process (Unsloth patches transformers globally):

* ``hf_peft_padded``          transformers + PEFT, right-padded batches with an attention mask
* ``unsloth_padded``          Unsloth FastLanguageModel, the same padded batches
* ``pronghorn_padding_free``  pronghorn FastLanguageModel, the 8 examples as one flat stream
* ``pronghorn_packing``       pronghorn, examples packed (TRL BFD) into rows of 2048, 8 rows a step

The loop is the same for all: forward with labels (pads are -100) under bf16 autocast, backward,
fused AdamW, zero_grad. ``real_tokens_per_s`` counts only tokens of examples; the epoch estimate
is ``dataset_size x mean truncated length / real_tokens_per_s``.

    python benchmarks/memory/bench_real_lengths.py --out $OUT/real_lengths.json            # all configs
    python benchmarks/memory/bench_real_lengths.py --config pronghorn_packing --out x.json  # one, in-process
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

CONFIGS = ["hf_peft_padded", "pronghorn_padding_free", "pronghorn_packing", "unsloth_padded"]


def sample_lengths(n: int, max_len: int, seed: int, hist_path: Path) -> list[int]:
    """``n`` lengths from the histogram (uniform inside a bin), truncated to ``max_len``."""
    hist = json.loads(hist_path.read_text())
    g = torch.Generator().manual_seed(seed)
    edges, probs = hist["bin_edges"], torch.tensor(hist["probabilities"], dtype=torch.float64)
    bins = torch.multinomial(probs, n, replacement=True, generator=g)
    out = []
    for b in bins.tolist():
        lo, hi = edges[b], edges[b + 1]
        out.append(min(max_len, int(lo + torch.randint(0, hi - lo, (1,), generator=g))))
    return out


def mean_truncated_length(max_len: int, hist_path: Path) -> float:
    return sum(sample_lengths(20000, max_len, 99, hist_path)) / 20000


def make_examples(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths]


def batches_for(config: str, examples: list[dict], batch_size: int, max_len: int, pad_id: int):
    """Yield (model kwargs, real token count) in the layout of ``config``."""
    from pronghorn.data.padding_free import PaddingFreeCollator

    if config.endswith("padded"):
        for i in range(0, len(examples) - batch_size + 1, batch_size):
            chunk = [e["input_ids"] for e in examples[i : i + batch_size]]
            L = max(map(len, chunk))
            ids = torch.full((len(chunk), L), pad_id)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(chunk):
                ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
            yield dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)), int(mask.sum())
        return
    collate = PaddingFreeCollator(pad_token_id=pad_id, max_length=max_len)
    if config == "pronghorn_packing":
        from datasets import Dataset

        from pronghorn.data.packing import pack_examples

        rows = list(pack_examples(Dataset.from_list(examples), max_len))
        examples = [dict(r) for r in rows]
    for i in range(0, len(examples) - batch_size + 1, batch_size):
        b = collate(examples[i : i + batch_size])
        kw = {k: b[k] for k in ("input_ids", "position_ids", "labels")}
        kw["use_cache"] = False
        yield kw, int(b["input_ids"].numel())


def run_one(args) -> dict:
    shape = _shared.common.get_shape(args.shape)
    record = _shared.common.envelope(benchmark="real_lengths", config=args.config, shape=shape.name, mode=args.mode,
                              batch_size=args.batch_size, max_seq_length=args.max_seq_length, status="started")
    try:
        framework = args.config.split("_")[0]
        model_dir = _shared.ensure_checkpoint(args.shape, args.model_dir)
        t0 = time.perf_counter()
        model = _shared.load(framework if framework != "hf" else "hf_peft", args.mode, model_dir,
                             args.max_seq_length, args.device)
        record["load_s"] = time.perf_counter() - t0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        record["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
        pad_id = shape.config.get("pad_token_id", 0)
        n_examples = args.batch_size * (args.warmup + args.steps) * (8 if args.config == "pronghorn_packing" else 1)
        lengths = sample_lengths(n_examples, args.max_seq_length, args.seed, args.histogram)
        examples = make_examples(lengths, shape.config["vocab_size"], args.seed)
        batches = list(batches_for(args.config, examples, args.batch_size, args.max_seq_length, pad_id))
        if len(batches) < args.warmup + args.steps:
            raise RuntimeError(f"only {len(batches)} batches for {args.warmup}+{args.steps} steps")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
        dev_type = "cuda" if args.device.startswith("cuda") else "cpu"
        model.train()

        def step(kw):
            kw = {k: (v.to(args.device) if torch.is_tensor(v) else v) for k, v in kw.items()}
            with torch.autocast(dev_type, dtype=torch.bfloat16):
                loss = model(**kw).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for kw, _ in batches[: args.warmup]:
            step(kw)
        _shared.common.sync(args.device)
        if dev_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed = batches[args.warmup : args.warmup + args.steps]
        t0 = time.perf_counter()
        for kw, _ in timed:
            step(kw)
        _shared.common.sync(args.device)
        elapsed = time.perf_counter() - t0
        real = sum(n for _, n in timed)
        computed = sum(int(kw["input_ids"].numel()) for kw, _ in timed)
        tps = real / elapsed
        hist = json.loads(args.histogram.read_text())
        dataset_tokens = hist["dataset_size_for_epoch_estimate"] * mean_truncated_length(args.max_seq_length,
                                                                                          args.histogram)
        record.update(status="ok", timed_steps=len(timed), timed_s=elapsed, real_tokens=real,
                      computed_positions=computed, pad_fraction=1 - real / computed, real_tokens_per_s=tps,
                      epoch_estimate_h=dataset_tokens / tps / 3600, epoch_dataset_tokens=dataset_tokens,
                      peak_gib=_shared.common.peak_gib(args.device))
    except Exception as e:  # recorded, not raised: the driver collects every configuration
        record.update(_shared.common.failure_fields(e, 2000, 4000))
    _shared.common.write_json(args.out, record)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, help="run one configuration in this process")
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="driver: configurations to run")
    _shared.add_run_args(p)
    p.add_argument("--mode", default="bf16", choices=["bf16", "qlora"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--histogram", type=Path, default=Path(__file__).resolve().parent / "length_histogram.json")
    p.add_argument("--timeout-s", type=float, default=470, help="driver: per-configuration limit")
    args = p.parse_args(argv)
    if args.config:
        rec = run_one(args)
        print(json.dumps({k: rec.get(k) for k in ("config", "status", "real_tokens_per_s", "peak_gib", "error")}))
        return 0
    _shared.ensure_checkpoint(args.shape, args.model_dir)
    results = []
    for config in args.configs:
        child_out = args.out.with_name(f"{args.out.stem}.{config}.json")
        child_out.unlink(missing_ok=True)
        argv = [__file__, "--config", config, "--out", str(child_out)] + [
            a for k, v in vars(args).items() if k in ("shape", "model_dir", "mode", "batch_size", "max_seq_length",
                                                      "warmup", "steps", "seed", "histogram", "device") and v is not None
            for a in (f"--{k.replace('_', '-')}", str(v))]
        rec = _shared.run_child(argv, child_out, args.timeout_s)
        rec.setdefault("config", config)
        results.append(rec)
        print(json.dumps({k: rec.get(k) for k in ("config", "status", "real_tokens_per_s", "epoch_estimate_h",
                                                  "peak_gib", "process")}), flush=True)
        _shared.common.write_json(args.out, _shared.common.envelope(benchmark="real_lengths", results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
