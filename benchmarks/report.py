"""Merge the per-configuration JSON records of benchmarks/train_throughput.py into one results JSON and a
markdown table, with speed and memory ratios against hf_peft and unsloth measured in the same run.

    python benchmarks/report.py --dir $OUT --out-json $OUT/results.json --out-md $OUT/results.md

Reads every ``*.json`` under ``--dir`` whose ``kind`` is ``train_throughput``; a sibling ``<name>.rc``
(written by run_gpu.sh) holding exit code 124 or 137 marks a run killed by its timeout. Imports no torch,
so it runs anywhere in a fraction of a second.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

MODE_ORDER = {"bf16": 0, "qlora": 1}
CONFIG_ORDER = {"hf_peft": 0, "hf_peft_kbit": 1, "liger": 2, "unsloth": 3, "pronghorn": 4}
BASELINES = ("hf_peft", "hf_peft_kbit", "unsloth")
SHOWN_VERSIONS = ["torch", "triton", "transformers", "peft", "trl", "bitsandbytes", "unsloth", "unsloth_zoo",
                  "liger-kernel", "cuda"]


def label(rec: dict) -> str:
    """The row name: the configuration plus any option that differs from the standard run."""
    name = rec["config"]
    if rec["config"] in ("unsloth", "pronghorn") and rec.get("gradient_checkpointing") == "true":
        name += " (gc=True)"
    if rec.get("autocast_bf16") is False:
        name += " (no autocast)"
    if rec.get("stash_mlp_layers") not in (None, 0, "0"):
        name += f" (stash {rec['stash_mlp_layers']})"
    if rec.get("stash_residual"):
        name += " (residual stash)"
    if rec.get("batches") == "pageable":
        name += " (pageable batches)"
    if rec.get("cuda_graphs") in ("on", "off"):
        name += f" (CUDA graphs {rec['cuda_graphs']})"
    if rec.get("offload_embedding") in ("on", "off"):
        name += f" (embeddings {'in host memory' if rec['offload_embedding'] == 'on' else 'on the GPU'})"
    gates = {"park": " (graphed gates parked)", "park-float": " (graphed gates parked, not 4-bit ones)",
             "compute": " (graphed gates recomputed)"}
    name += gates.get(rec.get("graph_gates"), "")
    return name


def load_records(root: Path) -> list:
    """All train_throughput records under ``root``, with timeouts marked from their ``.rc`` sidecars."""
    records = []
    for path in sorted(root.rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            print(f"skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(rec, dict) or rec.get("kind") != "train_throughput":
            continue
        rc_path = path.with_suffix(".rc")
        if rc_path.is_file():
            rc = rc_path.read_text().strip()
            rec["exit_code"] = int(rc) if rc.lstrip("-").isdigit() else rc
            if rec["status"] not in ("ok", "oom", "error") and rec["exit_code"] in (124, 137):
                rec["error"] = f"killed by the timeout after phase '{rec['status']}'"
                rec["status"] = "timeout"
        elif rec["status"] not in ("ok", "oom", "error"):
            rec["error"] = f"process ended during phase '{rec['status']}' (no exit code recorded)"
            rec["status"] = "incomplete"
        rec["label"] = label(rec)
        rec["record_file"] = str(path.relative_to(root))
        records.append(rec)
    return records


def _group_key(rec: dict) -> tuple:
    return rec["shape"], rec["mode"], rec["batch_size"], rec["seq_len"]


def add_ratios(records: list) -> None:
    """Speed and memory ratios against each of the ``BASELINES`` rows of the same shape/mode/batch."""
    base = {}
    for rec in records:
        if rec["status"] == "ok" and rec["label"] in BASELINES:
            base[_group_key(rec) + (rec["label"],)] = rec
    for rec in records:
        for name in BASELINES:
            b = base.get(_group_key(rec) + (name,))
            if rec["status"] != "ok" or b is None:
                continue
            rec[f"speed_vs_{name}"] = rec["tokens_per_s"] / b["tokens_per_s"]
            if rec.get("peak_gib") and b.get("peak_gib"):
                rec[f"memory_vs_{name}"] = rec["peak_gib"] / b["peak_gib"]
            first, b_first = _first_loss(rec), _first_loss(b)
            if first is not None and b_first is not None:
                rec[f"loss0_minus_{name}"] = first - b_first


def _first_loss(rec: dict):
    losses = rec.get("warmup_losses") or rec.get("losses")
    return losses[0] if losses else None


def median_step_ms(rec: dict):
    """The median timed step in ms: unlike the mean (tokens/s), one slow step does not move it."""
    steps = rec.get("step_s") or []
    return 1000 * statistics.median(steps) if steps else None


def clock_line(rows: list) -> str:
    """Median SM clock and board power of the samples taken after each timed step, per row that has them: a GPU
    at its power limit lowers its clock, and denser work (fewer idle gaps, fewer wasted passes) draws more
    power per cycle, so the configurations compared do not run at one clock."""
    parts = []
    for r in rows:
        samples = [e for e in r.get("allocator_events_per_step") or [] if "sm_clock_mhz" in e and "power_w" in e]
        if r["status"] == "ok" and samples:
            mhz = statistics.median(e["sm_clock_mhz"] for e in samples)
            watts = statistics.median(e["power_w"] for e in samples)
            parts.append(f"{r['label']} {r['mode']} {mhz:,.0f} MHz at {watts:.0f} W")
    return ("SM clock and board power, median of one sample after each timed step: " + "; ".join(parts)) if parts else ""


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "–" if x is None else format(x, spec) + suffix


def markdown(records: list, peak: dict | None) -> str:
    """The results as markdown: one section per shape, a table per section, then notes and versions."""
    lines = []
    shapes = sorted({r["shape"] for r in records})
    for shape in shapes:
        rows = sorted((r for r in records if r["shape"] == shape),
                      key=lambda r: (MODE_ORDER.get(r["mode"], 9), r["batch_size"], r["seq_len"],
                                     CONFIG_ORDER.get(r["config"], 9), r["label"]))
        ok = [r for r in rows if r["status"] == "ok"] or rows
        ref = ok[0]
        lines += [f"## {shape}", "",
                  f"- GPU: {ref.get('device')}; date: {ref.get('date')}; commit: {ref.get('commit')}",
                  f"- workload: LoRA r={ref.get('lora_r')} alpha={ref.get('lora_alpha')} on "
                  f"{', '.join(ref.get('target_modules', []))}; gradient checkpointing; "
                  f"{ref.get('warmup_steps')} warm-up + {ref.get('timed_steps')} timed steps; AdamW; "
                  f"bf16 autocast: {ref.get('autocast_bf16')}",
                  ]
        if peak:
            lines.append(f"- measured bf16 matmul peak ({peak['matmul_n']}³, median of {peak['repeats']}): "
                         f"{peak['tflops']:.1f} TFLOP/s; MFU is against it")
        elif ref.get("peak_matmul_tflops"):
            lines.append(f"- measured bf16 matmul peak: {ref['peak_matmul_tflops']:.1f} TFLOP/s; MFU is against it")
        if ref.get("shape_notes"):
            lines.append(f"- note: {ref['shape_notes']}")
        lines += ["", "| config | mode | batch×seq | tokens/s | ms/step | median ms | peak GiB | MFU (6N) | MFU (LoRA 4N) "
                      "| speed vs HF | mem vs HF | speed vs Unsloth | mem vs Unsloth | loss₀ − HF | status |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            ok_row = r["status"] == "ok"
            status = "ok" if ok_row else f"{r['status']}: {str(r.get('error', ''))[:120]}".replace("|", "/")
            lines.append("| " + " | ".join([
                r["label"], r["mode"], f"{r['batch_size']}×{r['seq_len']}",
                _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("ms_per_step"), ".1f"), _fmt(median_step_ms(r), ".1f"),
                _fmt(r.get("peak_gib"), ".2f"),
                _fmt(100 * r["mfu"] if ok_row else None, ".1f", "%"),
                _fmt(100 * r["mfu_lora"] if ok_row else None, ".1f", "%"),
                _fmt(r.get("speed_vs_hf_peft"), ".2f", "×"), _fmt(r.get("memory_vs_hf_peft"), ".2f", "×"),
                _fmt(r.get("speed_vs_unsloth"), ".2f", "×"), _fmt(r.get("memory_vs_unsloth"), ".2f", "×"),
                _fmt(r.get("loss0_minus_hf_peft"), "+.4f"), status]) + " |")
        kbit = [r for r in rows if r.get("speed_vs_hf_peft_kbit") and r["config"] != "hf_peft_kbit"]
        if kbit:
            lines += ["", "Against hf_peft_kbit (PEFT's documented QLoRA recipe, `prepare_model_for_kbit_training`): "
                      + "; ".join(f"{r['label']} {r['speed_vs_hf_peft_kbit']:.2f}× speed, "
                                  f"{_fmt(r.get('memory_vs_hf_peft_kbit'), '.2f', '×')} memory" for r in kbit)]
        clocks = clock_line(rows)
        if clocks:
            lines += ["", clocks]
        versions = ref.get("versions") or {}
        lines += ["", "Versions: " + ", ".join(f"{k} {versions[k]}" for k in SHOWN_VERSIONS if k in versions), ""]
    lines += [
        "MFU (6N) = (6 × matmul params + causal attention FLOPs) × tokens/s ÷ measured matmul peak, the usual "
        "definition as if every weight were trained. MFU (LoRA 4N) counts what LoRA needs: 4 × frozen matmul "
        "params (forward + input gradient) + 6 × LoRA params + attention. Attention per token = 12 × layers × "
        "keys-per-query × heads × head_dim, with keys-per-query = seq/2 (causal). Neither counts the forward "
        "recomputed by gradient checkpointing. loss₀ − HF is the first step's loss minus hf_peft's on the same "
        "batch: LoRA B starts at zero, so it measures forward-pass agreement with transformers. tokens/s and "
        "ms/step are over all timed steps (the mean); median ms is the median timed step.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder searched recursively for records")
    p.add_argument("--peak", help="peak.json from `common.py peak` (default: <dir>/peak.json if present)")
    p.add_argument("--out-json", help="default <dir>/results.json")
    p.add_argument("--out-md", help="default <dir>/results.md")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        raise SystemExit(f"--dir {root} is not a directory")
    peak_path = Path(args.peak) if args.peak else root / "peak.json"
    peak = json.loads(peak_path.read_text()) if peak_path.is_file() else None
    records = load_records(root)
    if not records:
        raise SystemExit(f"no train_throughput records under {root}")
    add_ratios(records)
    summary_keys = ["label", "config", "mode", "shape", "batch_size", "seq_len", "status", "tokens_per_s",
                    "ms_per_step", "peak_gib", "mfu", "mfu_lora", "speed_vs_hf_peft", "memory_vs_hf_peft",
                    "speed_vs_unsloth", "memory_vs_unsloth", "speed_vs_hf_peft_kbit", "memory_vs_hf_peft_kbit",
                    "loss0_minus_hf_peft", "error"]
    results = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "peak": peak, "summary": [{k: r.get(k) for k in summary_keys} for r in records],
               "records": records}
    out_json = Path(args.out_json) if args.out_json else root / "results.json"
    out_md = Path(args.out_md) if args.out_md else root / "results.md"
    # The merged file must not be read back as a record on the next run over the same folder.
    out_json.write_text(json.dumps(results, indent=1, default=str))
    text = markdown(records, peak)
    out_md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
