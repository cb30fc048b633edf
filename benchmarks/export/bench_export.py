"""Time and measure the exports of a LoRA model: merged 16-bit safetensors and a q8_0 GGUF.

Loads a checkpoint (``--model-dir``; built here with random bf16 weights when it holds no current
checkpoint of ``--shape``, default the Llama-3.1-8B shape), wraps it in LoRA (r=16 on every linear layer,
random non-zero B, so the merge does real work) on the GPU when there is one, then runs each step:

* ``merged_16bit``: ``save_pretrained_merged(model, dir, tokenizer, "merged_16bit")``
* ``gguf_q8_0``: ``save_pretrained_gguf(model, dir, tokenizer, "q8_0")`` (with its Ollama Modelfile)

and records for each its wall time, the peak resident memory of this process and its children (sampled
every 20 ms from /proc while the step runs), the GPU allocator's peak, and the size of what was written.
Results go to ``<out>/export-<shape>.json`` and ``.md`` with date, device, versions and commit.

GPU machine (from the repository root; ``.gpu_site`` from /work/shared/gpu/make_gpu_site.sh)::

    PYTHONPATH=$PWD/.gpu_site:$PWD python benchmarks/export/bench_export.py --shape llama-3.1-8b \\
        --model-dir /dev/shm/pronghorn-bench/llama-3.1-8b --workdir /tmp/pronghorn-bench-export --out $OUT/export

CPU smoke run: ``python benchmarks/export/bench_export.py --shape tiny --out /tmp/bench-export``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import common  # (benchmarks/ is a folder of scripts, not a package)

STEPS = ("merged_16bit", "gguf_q8_0")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0   # the process ended between listing and reading


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident memory of process ``pid`` (default: this one) plus all its descendants, in bytes."""
    pid = os.getpid() if pid is None else pid
    return _rss_bytes(pid) + sum(_rss_bytes(child) for child in _descendants(pid))


class PeakRSS:
    """Samples :func:`tree_rss_bytes` on a background thread while the ``with`` block runs; ``peak`` in bytes."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak = tree_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes())


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def ensure_checkpoint(shape: common.Shape, model_dir: Path) -> dict:
    """Build a random-init checkpoint of ``shape`` in ``model_dir`` unless a current one is there."""
    if common.checkpoint_is_current(shape, model_dir):
        return {"built": False}
    t0 = time.perf_counter()
    timings = common.build_checkpoint(shape, model_dir)
    return {"built": True, "build_s": round(time.perf_counter() - t0, 1), "n_params": timings["n_params"]}


def export_tokenizer(model_dir: Path, vocab_size: int):
    """The checkpoint's tokenizer when GGUF can carry it (BPE or SentencePiece), else a byte-level BPE
    stand-in: the random-init checkpoints carry a WordLevel tokenizer, and the benchmark measures weights."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = getattr(tok, "backend_tokenizer", None)
    kind = json.loads(backend.to_str())["model"]["type"] if backend is not None else "slow"
    if kind in ("BPE", "Unigram") or kind == "slow":
        return tok, f"checkpoint's ({kind})"
    from pronghorn.data import get_chat_template
    from tests.factories import byte_bpe_tokenizer

    stand_in = get_chat_template(byte_bpe_tokenizer(), "chatml", map_eos_token=False)
    if len(stand_in) > vocab_size:
        raise ValueError(f"the stand-in tokenizer has {len(stand_in)} tokens, more than the model's {vocab_size}")
    return stand_in, f"stand-in byte-level BPE ({len(stand_in)} tokens, padded to {vocab_size}; checkpoint's is {kind})"


def load_lora_model(model_dir: Path, device: str, rank: int, seed: int = 0):
    """The checkpoint in bf16 on ``device`` with LoRA on every linear layer and random non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 device_map=device if device == "cuda" else None)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS,
                                             lora_dropout=0.0))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 0.01)
    return model.eval()


def run_step(name: str, model, tokenizer, out_dir: Path, device: str) -> dict:
    """Run one export step under the RSS sampler; returns its record."""
    from pronghorn.export.gguf.save import save_pretrained_gguf
    from pronghorn.export.save import save_pretrained_merged

    if name == "merged_16bit":
        def export():
            save_pretrained_merged(model, out_dir, tokenizer, "merged_16bit", overwrite=True)
    elif name == "gguf_q8_0":
        def export():
            save_pretrained_gguf(model, out_dir, tokenizer, "q8_0", overwrite=True)
    else:
        raise ValueError(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
    common.sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = tree_rss_bytes()
    t0 = time.perf_counter()
    with PeakRSS() as sampler:
        export()
        common.sync(device)
    seconds = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    size = sum(files.values())
    return {"status": "ok", "seconds": round(seconds, 2), "rss_before_gib": _gib(rss_before),
            "peak_rss_gib": _gib(sampler.peak), "peak_rss_above_before_gib": _gib(sampler.peak - rss_before),
            "gpu_peak_gib": None if device != "cuda" else round(common.peak_gib(device), 3),
            "output_gib": _gib(size), "write_gib_per_s": round(size / 2**30 / seconds, 3), "files": files}


def markdown(result: dict) -> str:
    """A short report of ``result`` (the JSON record) as markdown."""
    lines = [f"# Export benchmark: {result['shape']} ({result['params_b']:.2f} B parameters)", "",
             f"- date: {result['date']}", f"- device: {result['device']}", f"- commit: {result['commit']}",
             f"- host: {result['cpus']} CPU cores, {result['host_ram_gib']} GiB RAM",
             f"- model: bf16 on {result['model_device']}, LoRA r={result['lora_r']} on {', '.join(LORA_TARGETS)}",
             f"- tokenizer: {result['tokenizer']}",
             f"- load: {result['load_s']} s; RSS after load {result['rss_after_load_gib']} GiB",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v != "absent"), "",
             ("| step | status | seconds | peak RSS (GiB, process + children) | above start (GiB) | GPU peak (GiB) "
              "| written (GiB) | GiB/s |"), "|---|---|---|---|---|---|---|---|"]
    for name, run in result["steps"].items():
        if run["status"] != "ok":
            lines.append(f"| {name} | {run['status']}: {run.get('error', '')[:120]} | | | | | | |")
            continue
        lines.append(f"| {name} | ok | {run['seconds']} | {run['peak_rss_gib']} | {run['peak_rss_above_before_gib']} "
                     f"| {run['gpu_peak_gib'] if run['gpu_peak_gib'] is not None else '-'} | {run['output_gib']} "
                     f"| {run['write_gib_per_s']} |")
    lines += ["", ("Peak RSS is sampled every 20 ms from /proc (this process and its descendants) while the step "
                   "runs; 'above start' subtracts the RSS just before the step (the loaded model, on CPU runs).")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (export-<shape>.json and .md go there)")
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(common.SHAPES),
                        help="shape of the checkpoint to build when --model-dir holds none")
    parser.add_argument("--model-dir", help="checkpoint folder (built here if it holds no current checkpoint of "
                        "--shape; default <workdir>/checkpoint-<shape>)")
    parser.add_argument("--workdir", default="/tmp/pronghorn-bench-export", help="where exports are written")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the exported files")
    parser.add_argument("--commit", help="git commit to record (a copy of the tree without .git records 'unknown')")
    args = parser.parse_args(argv)
    for key, value in common.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")

    shape = common.get_shape(args.shape)
    workdir = Path(args.workdir)
    model_dir = Path(args.model_dir) if args.model_dir else workdir / f"checkpoint-{shape.name}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    user_checkpoint = (model_dir / "config.json").is_file() and not (model_dir / "pronghorn_bench_shape.json").exists()
    checkpoint = {"built": False, "user_checkpoint": True} if user_checkpoint else ensure_checkpoint(shape, model_dir)
    t0 = time.perf_counter()
    model = load_lora_model(model_dir, device, args.lora_r)
    common.sync(device)
    load_s = time.perf_counter() - t0
    vocab_size = model.get_base_model().config.vocab_size
    tokenizer, tokenizer_note = export_tokenizer(model_dir, vocab_size)
    result = common.envelope(
        device, shape=shape.name, model_dir=str(model_dir), checkpoint=checkpoint, model_device=device,
        params_b=sum(p.numel() for p in model.get_base_model().parameters()) / 1e9, lora_r=args.lora_r,
        tokenizer=tokenizer_note, cpus=os.cpu_count(),
        host_ram_gib=round(os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**30, 1), load_s=round(load_s, 1),
        rss_after_load_gib=_gib(tree_rss_bytes()), steps={})
    result["commit"] = common.git_commit(args.commit)
    out = Path(args.out)
    stem = f"export-{shape.name}"
    for name in steps:
        target = workdir / name
        print(f"[bench_export] {name} -> {target}", flush=True)
        try:
            result["steps"][name] = run_step(name, model, tokenizer, target, device)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep measuring the other steps
            result["steps"][name] = common.failure_fields(exc)
        print(f"[bench_export] {name}: {json.dumps({k: v for k, v in result['steps'][name].items() if k != 'files'})}",
              flush=True)
        if not args.keep:
            shutil.rmtree(target, ignore_errors=True)
        common.write_json(out / f"{stem}.json", result)
        (out / f"{stem}.md").write_text(markdown(result))
    # The whole run's peak, checkpoint build and loading included (not per step; the steps' peaks are above).
    result["process_lifetime_max_rss_gib"] = _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    common.write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["status"] == "ok" for r in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
