"""Merge the vision-language benchmark's per-configuration records into results.json and results.md.

    python benchmarks/vision/vlm_report.py --dir $OUT/vlm

Reads every ``<config>.json`` record of kind ``train_vlm`` in ``--dir``; adds speed and memory ratios against
``hf_peft`` and ``unsloth`` of the same run, the first loss minus hf_peft's (LoRA B starts at zero, so equal
batches give equal first losses when a fast path computes the same forward), and whether every
configuration trained on the same tokens (each collates the same examples with its own collator).
Imports no torch.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

CONFIG_ORDER = {"hf_peft": 0, "unsloth": 1, "pronghorn": 2}
SHOWN_VERSIONS = ["torch", "torchvision", "triton", "transformers", "peft", "unsloth", "unsloth_zoo", "cuda"]
_FINAL = ("ok", "oom", "error", "timeout")


def mark_timeout(path: Path, limit: int) -> None:
    """Mark the record at ``path`` as killed by the suite's ``limit`` (seconds) unless it already finished."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        rec = {"kind": "train_vlm", "config": path.stem, "status": "started"}
    if rec.get("status") in _FINAL:
        return
    rec["error"] = f"killed by the suite's {limit}s limit during phase '{rec.get('status')}'"
    rec["status"] = "timeout"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(path)


def load_records(root: Path) -> list:
    records = []
    for path in sorted(Path(root).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            print(f"skipping unreadable {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(rec, dict) or rec.get("kind") != "train_vlm":
            continue
        if rec.get("status") not in _FINAL:
            rec["error"] = f"process ended during phase '{rec.get('status')}'"
            rec["status"] = "incomplete"
        records.append(rec)
    return sorted(records, key=lambda r: CONFIG_ORDER.get(r.get("config"), 9))


def _first_loss(rec: dict):
    losses = rec.get("warmup_losses") or rec.get("losses")
    return losses[0] if losses else None


def _workload(rec: dict):
    """The tokens, images and patches of every step, as this configuration's collator produced them."""
    stats = rec.get("batch_stats")
    if not stats:
        return None
    return [(s["tokens"], s["image_tokens"], s["images"], s["patches"]) for s in stats]


def add_comparisons(records: list) -> dict:
    """Ratios against hf_peft / unsloth and a check that all configurations saw the same workload."""
    base = {r["config"]: r for r in records if r["status"] == "ok" and r["config"] in ("hf_peft", "unsloth")}
    for rec in records:
        if rec["status"] != "ok":
            continue
        for name, b in base.items():
            rec[f"speed_vs_{name}"] = rec["tokens_per_s"] / b["tokens_per_s"]
            if rec.get("peak_gib") and b.get("peak_gib"):
                rec[f"memory_vs_{name}"] = rec["peak_gib"] / b["peak_gib"]
        if "hf_peft" in base and _first_loss(rec) is not None and _first_loss(base["hf_peft"]) is not None:
            rec["first_loss_minus_hf"] = _first_loss(rec) - _first_loss(base["hf_peft"])
    workloads = {r["config"]: _workload(r) for r in records if _workload(r) is not None}
    reference = next(iter(workloads.values()), None)
    differing = sorted(c for c, w in workloads.items() if w != reference)
    # Trained (label) tokens per step: differences change the loss, not the work, so they are reported apart.
    labels = {r["config"]: [s["label_tokens"] for s in r["batch_stats"]] for r in records if r.get("batch_stats")}
    label_ref = next(iter(labels.values()), None)
    return {"configs_with_batches": sorted(workloads), "same_workload": not differing,
            "workload_differs": differing,
            "label_tokens_differ": sorted(c for c, v in labels.items() if v != label_ref)}


def _f(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else format(value, spec)


def render_markdown(records: list, check: dict) -> str:
    first = next((r for r in records if r.get("versions")), records[0] if records else {})
    versions = first.get("versions", {})
    lines = [
        f"# Vision-language LoRA training throughput — {first.get('shape', '?')}",
        "",
        f"- date: {first.get('date', '?')}; device: {first.get('device', '?')}; commit: {first.get('commit', '?')}",
        "- versions: " + ", ".join(f"{k} {versions.get(k, '?')}" for k in SHOWN_VERSIONS),
        (f"- workload: batch {first.get('batch_size')} chat examples, images with sides in "
        f"{first.get('image_sides')} px, images per row cycling {first.get('row_image_counts')} (0 = text-only), "
        f"LoRA r={first.get('lora_r')} alpha={first.get('lora_alpha')} on language + vision layers, gradient "
        f"checkpointing, bf16 weights, bf16 autocast={first.get('autocast_bf16')}; "
        f"{first.get('warmup_steps')} warm-up + {first.get('timed_steps')} timed steps, plain loop (forward with "
        "labels, backward, fused AdamW)"),
        ("- tokens = non-padding sequence positions (text + image placeholders); text tokens exclude image "
         "tokens; peak = max_memory_allocated over the timed steps"),
        f"- same tokens/images in every configuration: {check['same_workload']}"
        + ("" if check["same_workload"] else f" (differs: {check['workload_differs']})")
        + (f"; trained-label counts differ for {check['label_tokens_differ']}" if check["label_tokens_differ"]
           else "; same trained-label counts"),
        "",
        ("| config | status | tokens/s | text tok/s | images/s | ms/step | median step s | peak GiB | model GiB "
         "| vs HF speed | vs Unsloth speed | vs Unsloth mem | loss₀ − HF | LoRA modules | load s | warm-up s |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ok = r["status"] == "ok"
        lines.append("| " + " | ".join([
            r.get("config", "?") + ("" if r.get("gradient_checkpointing") in ("unsloth", "non-reentrant", None)
                                    else f" (gc={r['gradient_checkpointing']})"),
            r["status"],
            _f(r.get("tokens_per_s") if ok else None, ",.0f", 1),
            _f(r.get("text_tokens_per_s") if ok else None, ",.0f", 1),
            _f(r.get("images_per_s") if ok else None, ".2f", 1),
            _f(r.get("ms_per_step") if ok else None, ",.0f", 1),
            _f(r.get("median_step_s") if ok else None, ".3f", 1),
            _f(r.get("peak_gib"), ".2f", 1),
            _f(r.get("model_gib"), ".2f", 1),
            _f(r.get("speed_vs_hf_peft"), ".2f", 1) + ("×" if r.get("speed_vs_hf_peft") else ""),
            _f(r.get("speed_vs_unsloth"), ".2f", 1) + ("×" if r.get("speed_vs_unsloth") else ""),
            _f(r.get("memory_vs_unsloth"), ".2f", 1) + ("×" if r.get("memory_vs_unsloth") else ""),
            _f(r.get("first_loss_minus_hf"), "+.4f", 1),
            str((r.get("lora_modules") or {}).get("total", "-")),
            _f(r.get("load_s"), ".1f", 1),
            _f(r.get("warmup_s"), ".1f", 1),
        ]) + " |")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r.get('config')}` ({r['status']}): {str(r.get('error'))[:400]}" for r in failed]
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        lines += ["", "Per-step seconds (timed steps) and per-step workload (tokens / image tokens / images):", ""]
        for r in ok:
            steps = ", ".join(f"{s:.3f}" for s in r["step_s"])
            lines.append(f"- `{r['config']}`: [{steps}]")
        ref = ok[0]
        work = ", ".join(f"{s['tokens']}/{s['image_tokens']}/{s['images']}"
                         for s in ref["batch_stats"][ref["warmup_steps"]:])
        lines.append(f"- workload per timed step ({ref['config']}'s collator): {work}")
        lines += ["", "LoRA-adapted linears per part: " + "; ".join(
            f"{r['config']} {r.get('lora_modules')}" for r in ok)]
    return "\n".join(lines) + "\n"


def write_report(root) -> str:
    """Write ``results.json`` and ``results.md`` in ``root``; returns the markdown."""
    root = Path(root)
    records = load_records(root)
    check = add_comparisons(records)
    md = render_markdown(records, check) if records else "no train_vlm records found\n"
    summary = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "workload_check": check, "records": records}
    (root / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (root / "results.md").write_text(md)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder with the <config>.json records")
    args = p.parse_args(argv)
    print(write_report(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
