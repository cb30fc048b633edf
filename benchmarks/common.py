"""Shared pieces of the benchmarks: model shapes, random-init checkpoints, FLOP counts, the measured
matmul peak, timing and peak-memory helpers, table cells, and the environment record every result
carries.

Importing this module imports only torch and the standard library: transformers is imported inside
the functions that need it, because Unsloth must be imported before transformers in its own run.

Command line (used by benchmarks/run_gpu.sh)::

    python benchmarks/common.py build --shape llama-3.1-8b --dir /dev/shm/pronghorn-bench/llama-3.1-8b
    python benchmarks/common.py peak --out $OUT/peak.json
"""
from __future__ import annotations

import argparse
import datetime
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

# The linear layers LoRA adapts in every configuration of the benchmark.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Packages whose versions every result records ("absent" when not importable in that process).
VERSIONED_PACKAGES = ["torch", "triton", "transformers", "peft", "accelerate", "trl", "bitsandbytes",
                      "unsloth", "unsloth_zoo", "liger-kernel", "safetensors", "tokenizers"]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Shape:
    """A model shape: a transformers ``model_type``, its config fields, and the default workload."""

    name: str
    model_type: str
    config: dict
    special_tokens: dict  # role -> (token text, id); roles: bos, eos, pad, unk
    batch_size: int = 2
    seq_len: int = 2048
    hf_attn: str = "sdpa"  # attn_implementation for the transformers-loaded configurations
    notes: str = ""


SHAPES = {
    "llama-3.1-8b": Shape(
        name="llama-3.1-8b", model_type="llama",
        config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004),
        special_tokens={"bos": ("<|begin_of_text|>", 128000), "eos": ("<|end_of_text|>", 128001),
                        "pad": ("<|finetune_right_pad_id|>", 128004), "unk": ("<|reserved_special_token_0|>", 128002)},
    ),
    "qwen3-8b": Shape(
        name="qwen3-8b", model_type="qwen3",
        config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=False,
                    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        special_tokens={"bos": ("<|endoftext|>", 151643), "eos": ("<|im_end|>", 151645),
                        "pad": ("<|endoftext|>", 151643), "unk": ("<|object_ref_start|>", 151646)},
    ),
    "gemma-2-9b": Shape(
        name="gemma-2-9b", model_type="gemma2",
        config=dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                    hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, sliding_window=4096, query_pre_attn_scalar=256,
                    bos_token_id=2, eos_token_id=1, pad_token_id=0),
        special_tokens={"bos": ("<bos>", 2), "eos": ("<eos>", 1), "pad": ("<pad>", 0), "unk": ("<unk>", 3)},
        hf_attn="eager",
        notes="transformers refuses SDPA for Gemma-2 (attention softcapping), so hf_peft/liger use eager",
    ),
    # CPU smoke-test shapes: the same families, small enough to train in seconds.
    "tiny": Shape(
        name="tiny", model_type="llama",
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        special_tokens={"bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<pad>", 0), "unk": ("<unk>", 3)},
        batch_size=2, seq_len=64,
    ),
    "tiny-qwen3": Shape(
        name="tiny-qwen3", model_type="qwen3",
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        special_tokens={"bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<pad>", 0), "unk": ("<unk>", 3)},
        batch_size=2, seq_len=64,
    ),
    "tiny-gemma2": Shape(
        name="tiny-gemma2", model_type="gemma2",
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=32,
                    query_pre_attn_scalar=16, tie_word_embeddings=True,
                    bos_token_id=2, eos_token_id=1, pad_token_id=0),
        special_tokens={"bos": ("<bos>", 2), "eos": ("<eos>", 1), "pad": ("<pad>", 0), "unk": ("<unk>", 3)},
        batch_size=2, seq_len=64, hf_attn="eager",
    ),
}


def get_shape(name: str) -> Shape:
    """The :class:`Shape` called ``name``; raises ``KeyError`` listing the known names."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return SHAPES[name]


def build_config(shape: Shape):
    """The transformers config of ``shape`` (no weights)."""
    from transformers import AutoConfig

    # deep copy: transformers normalises nested rope dicts in place, which would change the shape's marker
    return AutoConfig.for_model(shape.model_type, **copy.deepcopy(shape.config))


# ---------------------------------------------------------------------------------------------
# Checkpoint on disk: random bf16 weights plus a tokenizer of exactly the config's vocabulary size
# ---------------------------------------------------------------------------------------------

def build_tokenizer(shape: Shape):
    """A WordLevel tokenizer with one entry per id of the shape's vocabulary.

    Loaders (Hugging Face, Unsloth, pronghorn) check that the tokenizer matches the embedding size, so
    every id has a token; the special tokens sit at the ids the real model family uses.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = shape.config["vocab_size"]
    names = {tid: text for text, tid in shape.special_tokens.values()}
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    if len(vocab) != vocab_size:
        raise ValueError(f"special tokens of {shape.name} collide with generated words: {shape.special_tokens}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=shape.special_tokens["unk"][0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    roles = {f"{role}_token": text for role, (text, _) in shape.special_tokens.items()}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=shape.config["max_position_embeddings"],
                                   **roles)


def _marker(shape: Shape) -> dict:
    return {"shape": shape.name, "model_type": shape.model_type, "config": shape.config}


def checkpoint_is_current(shape: Shape, path) -> bool:
    """True when ``path`` holds a checkpoint this module built for exactly ``shape``."""
    marker = Path(path) / "pronghorn_bench_shape.json"
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == json.loads(json.dumps(_marker(shape)))


def prepare_build(path, device: str | None) -> tuple[Path, str]:
    """An empty folder at ``path`` (a previous build there is removed) and the device to build on (CUDA when
    present, unless ``device`` names one)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path, device or ("cuda" if torch.cuda.is_available() else "cpu")


def build_checkpoint(shape: Shape, path, device: str | None = None, seed: int = 0) -> dict:
    """Write a random-init bf16 checkpoint of ``shape`` plus its tokenizer to ``path``.

    Weights are created directly on ``device`` (default: CUDA when present) in bf16, so an 8B model
    is initialised in seconds instead of minutes on CPU. Returns timings in seconds.
    """
    from transformers import AutoModelForCausalLM

    path, device = prepare_build(path, device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(build_config(shape), dtype=torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.save_pretrained(path)
    t2 = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    build_tokenizer(shape).save_pretrained(path)
    t3 = time.perf_counter()
    # Written last, so an interrupted build is never mistaken for a complete one.
    (path / "pronghorn_bench_shape.json").write_text(json.dumps(_marker(shape), indent=1))
    return {"init_s": t1 - t0, "save_s": t2 - t1, "tokenizer_s": t3 - t2, "n_params": n_params}


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------

def _mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to under a causal mask, optionally limited to ``window``.

    Full causal attention gives seq_len / 2 (the usual "half of the square" convention); a sliding
    window shorter than the sequence attends to fewer keys.
    """
    if window is None or window >= seq_len:
        return seq_len / 2
    # Query i sees min(i + 1, window) keys.
    total = window * (window + 1) / 2 + (seq_len - window) * window
    return total / seq_len


def flop_counts(shape: Shape, seq_len: int, lora_r: int, target_modules=TARGET_MODULES) -> dict:
    """Matmul parameter counts and training FLOPs per token for ``shape`` at ``seq_len``.

    * ``matmul_params``: weights of every linear layer (attention and MLP projections, LM head);
      embedding lookups and norms are not matmuls and are left out.
    * ``attn_flops_per_token``: causal attention scores and weighted values, forward + backward:
      3 (fwd + 2 bwd) x 2 (QK^T and PV) x 2 (multiply-add) x n_layers x keys_per_query x (heads x head_dim),
      which for full layers is the standard 6 x n_layers x seq x d_q (12 x L x s x d_q halved for causal).
    * ``flops_per_token_6n``: 6 x matmul_params + attention; the issue's MFU definition, as if every weight
      received a gradient.
    * ``flops_per_token_lora``: 4 x matmul_params (frozen weights: forward + input gradient, no weight
      gradient) + 6 x lora_params + attention; the work LoRA training actually needs.
    Neither counts the forward recomputed by gradient checkpointing (that would be hardware FLOPs).
    """
    c = shape.config
    hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    d_q, d_kv = heads * head_dim, kv_heads * head_dim
    linears = {"q_proj": (hidden, d_q), "k_proj": (hidden, d_kv), "v_proj": (hidden, d_kv),
               "o_proj": (d_q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
               "down_proj": (inter, hidden)}
    per_layer = sum(i * o for i, o in linears.values())
    lora_per_layer = sum(lora_r * (i + o) for name, (i, o) in linears.items() if name in target_modules)
    matmul_params = layers * per_layer + hidden * c["vocab_size"]
    lora_params = layers * lora_per_layer
    window = c.get("sliding_window")
    if shape.model_type == "gemma2":  # every other layer (starting with the first) is sliding
        n_sliding = (layers + 1) // 2
    else:
        n_sliding, window = 0, None
    keys = (layers - n_sliding) * _mean_keys_per_query(seq_len, None) + n_sliding * _mean_keys_per_query(seq_len, window)
    attn = 3 * 2 * 2 * keys * d_q
    return {"matmul_params": matmul_params, "lora_params": lora_params, "attn_flops_per_token": attn,
            "flops_per_token_6n": 6 * matmul_params + attn,
            "flops_per_token_lora": 4 * matmul_params + 6 * lora_params + attn}


def measure_matmul_tflops(n: int = 8192, repeats: int = 10, warmup: int = 3, device: str | None = None) -> dict:
    """Measured dense bf16 matmul rate: median over ``repeats`` timed ``n x n x n`` products (TFLOP/s)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t
        if i >= warmup:
            times.append(seconds)
    median = statistics.median(times)
    return {"matmul_n": n, "repeats": repeats, "median_s": median, "tflops": 2 * n**3 / median / 1e12,
            "device": device_name(device)}


# ---------------------------------------------------------------------------------------------
# Timing, memory and table cells shared by the benchmark scripts
# ---------------------------------------------------------------------------------------------

def _on_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    """Wait for the GPU's queued work (nothing to wait for off CUDA); ``device`` is a str or torch.device."""
    if _on_cuda(device):
        torch.cuda.synchronize()


def time_ms(fn, device, warmup: int, iters: int) -> float:
    """Mean milliseconds per call of ``fn`` after ``warmup`` calls (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if _on_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def gemm_bench_parser(description: str) -> argparse.ArgumentParser:
    """The options of the cuBLAS microbenchmarks (bench_grouped_gemm, bench_lora_epilogue, bench_gemm_host)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--iters", type=int, default=50, help="back-to-back calls per timing")
    parser.add_argument("--repeats", type=int, default=7, help="timings, of which the median is kept")
    return parser


def median_device_ms(fn, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean CUDA-event time per call over ``iters`` back-to-back calls."""
    return statistics.median(time_ms(fn, "cuda", warmup=2, iters=iters) for _ in range(repeats))


def peak_mib(fn, device) -> float | None:
    """Memory allocated by one call of ``fn`` at its peak, above what was allocated before (MiB); None off CUDA."""
    if not _on_cuda(device):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_gib(device) -> float | None:
    """The CUDA allocator's peak since its last reset (GiB); None off CUDA."""
    return torch.cuda.max_memory_allocated() / 2**30 if _on_cuda(device) else None


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the accelerator running out of memory (an expected outcome, not a bug)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure_fields(exc: BaseException, error_chars: int = 1500, traceback_chars: int = 3000) -> dict:
    """What a trial record says about the exception ``exc`` that ended it, called inside its ``except``:
    status ``"oom"`` or ``"failed"``, and the ends of its repr and traceback."""
    return dict(status="oom" if is_oom(exc) else "failed", error=repr(exc)[-error_chars:],
                traceback=traceback.format_exc()[-traceback_chars:])


def kernel_bench_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every kernel microbenchmark takes: --out, --smoke, --warmup, --iters."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    return parser


def kernel_bench_device(parser: argparse.ArgumentParser, smoke: bool) -> torch.device:
    """CUDA when present; the CPU only for ``--smoke`` runs (anything else is a usage error via ``parser``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        parser.error("needs a CUDA GPU; use --smoke (with TRITON_INTERPRET=1) to check the script on CPU")
    return device


def fmt_cell(value, spec: str) -> str:
    """``value`` formatted with ``spec`` (e.g. ``"9.3f"``), or a right-aligned '-' of the same width for None."""
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------------
# Environment record
# ---------------------------------------------------------------------------------------------

class Timer:
    """Per-step wall time: CUDA events on GPU (no sync inside the loop), perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> list:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


TIMELINE_STEPS = 6  # device-only steps traced: enough that a slow step shows up next to typical ones

# The fused AdamW step's kernels close every training step of the benchmark loop.
STEP_END_KERNEL = "FusedOptimizerTensorListMetadata"


def write_profile(step, batches, path) -> None:
    """Two steps under torch.profiler (per-kernel tables by device time and by host time, to ``path``), two under
    cProfile (Python functions by own time, to ``path`` with suffix ``.host.txt``), then ``TIMELINE_STEPS`` with
    only the device traced (:func:`device_timeline` over all of them and :func:`per_step_timelines`, to ``path``
    with suffix ``.timeline.json``)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for batch in batches[:2]:
            step(batch)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
    # By host time too: CUDA runtime calls that block (synchronizations, launches into a full queue) show here.
    host_table = averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
    Path(path).write_text(table + "\n\nBy self CPU time:\n" + host_table + "\n\nBy launching op:\n"
                          + kernels_by_launching_op(prof.events()))
    host = cProfile.Profile()
    host.enable()
    for batch in batches[:2]:
        step(batch)
    torch.cuda.synchronize()
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(45)
    Path(path).with_suffix(".host.txt").write_text(text.getvalue())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # device only: no host-side profiler overhead
        for batch in batches[:TIMELINE_STEPS]:
            step(batch)
        torch.cuda.synchronize()
    kernels = [(e.start_ns(), e.start_ns() + e.duration_ns(), e.name(), e.device_resource_id())
               for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
    timeline = device_timeline(kernels) | {"steps": per_step_timelines(kernels)}
    Path(path).with_suffix(".timeline.json").write_text(json.dumps(timeline, indent=1))


def find_host_syncs(step, batch, frames: int = 6) -> list[dict]:
    """Run one ``step(batch)`` with CUDA's sync debug mode on and return each place that made the host wait
    for the GPU (a ``.item()``, a ``bool`` of a tensor, a copy to pageable memory), as its innermost Python
    frames and how many times it happened. Every such wait drains the GPU's queue: after it, the GPU idles
    until Python has queued more work."""
    import traceback
    import warnings

    found: dict[tuple, dict] = {}
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        stack = tuple(f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno} {f.name}"
                      for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename)[-frames:]
        entry = found.setdefault(stack, {"count": 0, "message": str(message)[:160], "stack": list(stack)})
        entry["count"] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    torch.cuda.synchronize()
    return sorted(found.values(), key=lambda e: -e["count"])


def kernels_by_launching_op(events, top: int = 80) -> str:
    """Device time per (host op, its input shapes, kernel), full kernel names: which call made each memset,
    copy or small GEMM that the per-kernel table lists only by (truncated) name."""
    totals: dict[tuple[str, str, str], list] = {}
    for evt in events:
        for k in getattr(evt, "kernels", []):
            key = (evt.name, str(getattr(evt, "input_shapes", ""))[:120], k.name[:140])
            entry = totals.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += k.duration / 1e3  # us -> ms
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return "\n".join(f"{ms:9.3f} ms {n:5d}x  {op}  {shapes}\n{'':22}{kernel}" for (op, shapes, kernel), (n, ms) in rows)


def device_timeline(kernels: list[tuple[int, int, str, int]], top: int = 15) -> dict:
    """How busy the GPU was over a profiled window: ``kernels`` are (start_ns, end_ns, name, stream).

    Returns the window, the time any kernel or copy ran (union over streams), the busy time of the
    stream that ran the most, and the ``top`` largest gaps in which nothing ran, each with the names of
    the activity before and after it: a gap is time the GPU waited on the host (Python, a launch, a
    synchronisation), which a faster kernel cannot win back.
    """
    if not kernels:
        return {"window_ms": 0.0, "busy_ms": 0.0, "busy_fraction": 0.0, "gaps": []}
    kernels = sorted(kernels)
    per_stream: dict[int, float] = {}
    for start, end, _, stream in kernels:
        per_stream[stream] = per_stream.get(stream, 0.0) + (end - start)
    busy, gaps, cur_end, cur_name = 0, [], kernels[0][0], kernels[0][2]
    for start, end, name, _ in kernels:
        if start > cur_end:
            gaps.append((start - cur_end, cur_name, name))
        if end > cur_end:
            busy += end - max(start, cur_end)
            cur_end, cur_name = end, name
    window = cur_end - kernels[0][0]
    gaps.sort(reverse=True)
    main = max(per_stream, key=per_stream.get)
    main_gaps, waiting_on_copies = _main_stream_gaps(kernels, main)
    return {
        "window_ms": window / 1e6,
        "busy_ms": busy / 1e6,
        "busy_fraction": busy / window,
        "main_stream_busy_ms": per_stream[main] / 1e6,
        "idle_ms_in_gaps_over_100us": sum(g for g, _, _ in gaps if g > 100_000) / 1e6,
        # Main (compute) stream idle while a side stream ran: compute waiting on copies, or overlap that hid them.
        "main_stream_idle_ms": (window - per_stream[main]) / 1e6,
        "main_stream_idle_while_side_streams_ran_ms": waiting_on_copies / 1e6,
        "gaps": [{"ms": g / 1e6, "after": a[:80], "before": b[:80]} for g, a, b in gaps[:top]],
        "main_stream_gaps": [{"ms": g / 1e6, "after": a[:80], "before": b[:80]} for g, a, b in main_gaps[:top]],
        # Where the compute stream's idle time sits, summed by the pair of kernels around each gap.
        "main_stream_idle_by_neighbours": _idle_by_neighbours(main_gaps, top),
    }


def per_step_timelines(kernels: list[tuple[int, int, str, int]], end_marker: str = STEP_END_KERNEL,
                       top: int = 5) -> list[dict]:
    """:func:`device_timeline` of each training step in ``kernels``; a step ends with the last kernel of each
    run of kernels whose name contains ``end_marker`` (the optimizer's). Comparing a slow step with its
    neighbours shows where its extra time went: longer kernels, or gaps (the GPU waiting)."""
    kernels = sorted(kernels)
    steps, current = [], []
    for i, k in enumerate(kernels):
        current.append(k)
        nxt = kernels[i + 1][2] if i + 1 < len(kernels) else ""
        if end_marker in k[2] and end_marker not in nxt:
            steps.append(current)
            current = []
    if current:
        steps.append(current)
    keys = ("window_ms", "busy_ms", "main_stream_busy_ms", "main_stream_idle_ms",
            "main_stream_idle_while_side_streams_ran_ms", "main_stream_gaps")
    out = []
    for group in steps:
        t = device_timeline(group, top)
        out.append({k: t[k] for k in keys if k in t})
    return out


def _idle_by_neighbours(gaps: list, top: int) -> list[dict]:
    totals: dict[tuple[str, str], list] = {}
    for g, after, before in gaps:
        entry = totals.setdefault((after[:60], before[:60]), [0, 0])
        entry[0] += g
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"ms": ms / 1e6, "count": n, "after": a, "before": b} for (a, b), (ms, n) in ranked]


def _main_stream_gaps(kernels: list[tuple[int, int, str, int]], main: int) -> tuple[list, int]:
    """Gaps between consecutive activities of stream ``main`` (largest first), and how much of them other
    streams filled."""
    own = [k for k in kernels if k[3] == main]
    others = [(s, e) for s, e, _, stream in kernels if stream != main]
    gaps, covered = [], 0
    for (_, end, name, _), (start, _, next_name, _) in zip(own, own[1:]):
        if start > end:
            gaps.append((start - end, name, next_name))
            covered += sum(max(0, min(e, start) - max(s, end)) for s, e in others if s < start and e > end)
    gaps.sort(reverse=True)
    return gaps, covered


def device_name(device: str | None = None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def package_versions() -> dict:
    """Installed version of each package in ``VERSIONED_PACKAGES``, or ``"absent"``."""
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    out["python"] = sys.version.split()[0]
    out["cuda"] = torch.version.cuda
    return out


def git_commit(default: str | None = None) -> str:
    """``default`` when given, else the commit of the checkout this file lives in (+ '-dirty'), else 'unknown'."""
    if default:
        return default
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def envelope(device=None, **fields) -> dict:
    """A result record: when, where (``device``, default CUDA when present) and with what it was measured,
    then ``fields``."""
    return dict(date=now_utc(), device=device_name(None if device is None else str(device).split(":")[0]),
                versions=package_versions(), commit=git_commit(), **fields)


def write_json(path, obj) -> None:
    """Write ``obj`` atomically, so a process killed mid-write leaves the previous record intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random-init checkpoint + tokenizer of a shape")
    b.add_argument("--shape", required=True, choices=sorted(SHAPES))
    b.add_argument("--dir", required=True, help="output directory (e.g. /dev/shm/pronghorn-bench/<shape>)")
    b.add_argument("--force", action="store_true", help="rebuild even if a current checkpoint is there")
    b.add_argument("--clean-siblings", action="store_true",
                   help="delete other shapes' checkpoints next to --dir (keeps /dev/shm from filling up)")
    p = sub.add_parser("peak", help="measure the bf16 matmul rate once and write it as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=8192 if torch.cuda.is_available() else 1024)
    p.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)

    if args.cmd == "build":
        shape, path = get_shape(args.shape), Path(args.dir)
        if args.clean_siblings and path.parent.is_dir():
            for other in path.parent.iterdir():
                if other != path and (other / "pronghorn_bench_shape.json").is_file():
                    print(f"removing other shape's checkpoint {other}", flush=True)
                    shutil.rmtree(other)
        if not args.force and checkpoint_is_current(shape, path):
            print(f"checkpoint for {shape.name} already at {path}; reusing it", flush=True)
            return 0
        timings = build_checkpoint(shape, path)
        print(f"built {shape.name} ({timings['n_params'] / 1e9:.2f} B params) at {path}: "
              f"init {timings['init_s']:.1f} s, save {timings['save_s']:.1f} s, "
              f"tokenizer {timings['tokenizer_s']:.1f} s", flush=True)
    else:
        result = measure_matmul_tflops(n=args.n, repeats=args.repeats)
        result.update(date=now_utc(), versions=package_versions())
        write_json(args.out, result)
        print(f"bf16 matmul {args.n}^3 on {result['device']}: {result['tflops']:.1f} TFLOP/s (median of "
              f"{args.repeats})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
