"""End-to-end LoRA / QLoRA training throughput of one configuration, in its own process.

Unsloth and Liger patch transformers for the whole process, so every configuration runs alone:

    python benchmarks/train_throughput.py --shape llama-3.1-8b --config hf_peft --mode bf16 \
        --model-dir /dev/shm/pronghorn-bench/llama-3.1-8b --out $OUT/hf_peft-bf16.json

Configurations (all train with the same plain loop, see ``train``):

* ``hf_peft``   transformers ``from_pretrained`` (SDPA) + PEFT LoRA, non-reentrant gradient checkpointing
* ``hf_peft_kbit`` QLoRA only: ``hf_peft`` plus PEFT's ``prepare_model_for_kbit_training``, the recipe PEFT's
  QLoRA guide documents (it upcasts every non-4-bit weight, embeddings and LM head included, to fp32)
* ``liger``     the same after Liger-Kernel's patch for the model family
* ``unsloth``   ``unsloth.FastLanguageModel`` load + ``get_peft_model``
* ``pronghorn`` ``pronghorn.FastLanguageModel`` load + ``get_peft_model`` (the same call signature)

The JSON record is rewritten after every phase (started, loaded, warmed, ok), so a run killed by a
timeout still leaves how far it got; an exception or an out-of-memory error is recorded, not raised.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from stall_sampler import StallSampler  # noqa: E402

CONFIGS = ["hf_peft", "hf_peft_kbit", "liger", "unsloth", "pronghorn"]
HF_CONFIGS = ("hf_peft", "hf_peft_kbit", "liger")
MODES = ["bf16", "qlora"]
LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "qwen3": "apply_liger_kernel_to_qwen3",
                 "gemma2": "apply_liger_kernel_to_gemma2"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(common.SHAPES))
    p.add_argument("--config", required=True, choices=CONFIGS)
    p.add_argument("--mode", default="bf16", choices=MODES, help="bf16 LoRA or 4-bit (nf4) QLoRA")
    p.add_argument("--model-dir", help="checkpoint built by `common.py build` (default /dev/shm/pronghorn-bench/<shape>)")
    p.add_argument("--out", required=True, help="JSON record to write")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: the shape's, 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the shape's, 2048)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (Unsloth compiles here; pronghorn QLoRA reaches its steady step time by the fifth)")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gc", default="unsloth", choices=["unsloth", "true"],
                   help="use_gradient_checkpointing passed to unsloth/pronghorn get_peft_model; "
                        "hf_peft and liger always use non-reentrant checkpointing")
    p.add_argument("--attn", choices=["sdpa", "eager"],
                   help="attn_implementation for hf_peft/liger (default: the shape's; sdpa except Gemma-2)")
    p.add_argument("--stash-mlp-layers", default=None,
                   help="pronghorn only: stash the MLP gate outputs of the first N checkpointed layers in host "
                        "memory so the backward recompute skips their GEMMs (0: off; auto: every layer that is "
                        "not graphed; default: the library's)")
    p.add_argument("--stash-residual", type=int, choices=[0, 1], default=0,
                   help="pronghorn only, experimental: park each checkpointed layer's post-attention residual in "
                        "host memory so the backward recompute skips o_proj (1) or recompute it (0, the default)")
    p.add_argument("--cuda-graphs", choices=["default", "on", "off"], default="default",
                   help="pronghorn only: replay checkpointed layers as CUDA graphs (on), run them eagerly (off), "
                        "or leave the library's default")
    p.add_argument("--graph-gates", choices=["default", "park", "park-float", "compute"], default="default",
                   help="pronghorn only: graphed layers park their MLP gate outputs in host memory so the recompute "
                        "skips the gate GEMM (park; park-float: not those of 4-bit layers), recompute them "
                        "(compute), or leave the library's default")
    p.add_argument("--offload-embedding", choices=["default", "on", "off"], default="default",
                   help="pronghorn only: keep the frozen input embedding table in pinned host memory (on), on "
                        "the GPU (off), or leave the library's default")
    p.add_argument("--batches", choices=["pinned", "pageable"], default="pinned",
                   help="host memory of the input batches: pinned, as a DataLoader with pin_memory=True (the "
                        "Trainer's default) gives them, so their non-blocking copy does not wait for the GPU; "
                        "pageable makes every step's input copy wait for the previous step to finish")
    p.add_argument("--profile", metavar="PATH",
                   help="after timing, run 2 more steps under torch.profiler and write the kernel table here")
    p.add_argument("--stall-trace", metavar="PATH",
                   help="sample the host's Python stack during the timed steps and write, for each slow step, where "
                        "the host was (benchmarks/stall_sampler.py) to PATH as JSON; it slows a host-bound step, "
                        "so use it to diagnose, not for throughput")
    p.add_argument("--find-syncs", action="store_true",
                   help="after timing, run one more step with CUDA's sync debug mode and record where the host "
                        "waited for the GPU (host_syncs in the JSON)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="run forward without bf16 autocast (weights are bf16 either way)")
    p.add_argument("--peak-json", help="matmul peak written by `common.py peak` (else measured here)")
    p.add_argument("--commit", help="git commit to record (default: asks git, else 'unknown')")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Loaders: each returns a PEFT-wrapped model with gradient checkpointing on, ready to train
# ---------------------------------------------------------------------------------------------

def _bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_hf_peft(args, shape, model_dir, kbit_prep: bool = False):
    """transformers + PEFT, the reference recipe.

    QLoRA skips ``prepare_model_for_kbit_training`` unless ``kbit_prep``: it upcasts norms, embeddings and
    the LM head to fp32, which the other configurations do not do; the checkpointing and input-grad hook it
    would add are set here either way (non-reentrant, as for every HF row).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.bfloat16, attn_implementation=args.attn, device_map={"": args.device})
    if args.mode == "qlora":
        kwargs["quantization_config"] = _bnb_config()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if kbit_prep:
        if args.mode != "qlora":
            raise ValueError("hf_peft_kbit is the QLoRA recipe; run it with --mode qlora")
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                      target_modules=common.TARGET_MODULES, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_liger(args, shape, model_dir):
    """Liger-Kernel's class-level patch for the family (RoPE, RMSNorm, SwiGLU/GeGLU, fused linear CE), then hf_peft."""
    import liger_kernel.transformers as liger

    if shape.model_type not in LIGER_PATCHES:
        raise ValueError(f"no Liger patch mapped for model_type {shape.model_type!r}; known: {sorted(LIGER_PATCHES)}")
    getattr(liger, LIGER_PATCHES[shape.model_type])()
    return load_hf_peft(args, shape, model_dir)


def _fast_language_model_peft(flm, args, model_dir, seq_len, extra=None):
    model, _tokenizer = flm.from_pretrained(model_name=str(model_dir), max_seq_length=seq_len,
                                            dtype=torch.bfloat16, load_in_4bit=args.mode == "qlora")
    gc = "unsloth" if args.gc == "unsloth" else True
    return flm.get_peft_model(model, r=args.rank, lora_alpha=args.alpha, lora_dropout=0,
                              target_modules=list(common.TARGET_MODULES), use_gradient_checkpointing=gc,
                              random_state=3407, **(extra or {}))


def load_unsloth(args, shape, model_dir, seq_len):
    """Unsloth's FastLanguageModel (imported first thing in this process, as Unsloth requires)."""
    from unsloth import FastLanguageModel

    return _fast_language_model_peft(FastLanguageModel, args, model_dir, seq_len, extra={"bias": "none"})


def load_pronghorn(args, shape, model_dir, seq_len):
    """pronghorn's Unsloth-compatible FastLanguageModel."""
    from pronghorn import FastLanguageModel
    from pronghorn.memory.stash import set_residual_stash, set_stashed_layers

    if args.stash_mlp_layers is not None:
        set_stashed_layers(args.stash_mlp_layers)
    set_residual_stash(bool(args.stash_residual))
    if args.cuda_graphs != "default":
        from pronghorn.memory.layer_graphs import set_layer_graphs

        set_layer_graphs(args.cuda_graphs == "on")
    if args.graph_gates != "default":
        from pronghorn.memory.graph_stash import set_graph_gate_stash

        set_graph_gate_stash(args.graph_gates != "compute", quantized=args.graph_gates != "park-float")
    extra = {} if args.offload_embedding == "default" else {"offload_embedding": args.offload_embedding == "on"}
    return _fast_language_model_peft(FastLanguageModel, args, model_dir, seq_len, extra=extra)


# ---------------------------------------------------------------------------------------------
# The training loop shared by every configuration
# ---------------------------------------------------------------------------------------------

def make_batches(vocab_size: int, n: int, batch_size: int, seq_len: int, seed: int = 1234) -> torch.Tensor:
    """``n`` batches of random token ids, identical in every configuration's process."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, batch_size, seq_len), generator=gen)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _watch_full_collections():
    """Start timing Python's full (generation 2) garbage collections; call the result to stop and get their
    durations in seconds. A full collection walks every live object and can stall a step."""
    import gc

    pauses, started = [], []

    def callback(phase, info):
        if info.get("generation") != 2:
            return
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(callback)

    def stop():
        gc.callbacks.remove(callback)
        return pauses

    return stop


# Allocator counters read after every timed step: a cudaMalloc / cudaFree (or a retry, which frees the whole
# cache), or a new pinned host block (cudaHostAlloc page-locks it, milliseconds per block) inside a step stalls
# the host or the device and can explain a step far slower than its peers.
_ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
_HOST_COUNTERS = ("num_host_alloc", "num_host_free", "host_alloc_time.total")


def _allocator_counters(device_type: str) -> dict:
    if device_type != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    counters = {k: stats.get(k, 0) for k in _ALLOCATOR_COUNTERS}
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return counters | {k: host.get(k, 0) for k in _HOST_COUNTERS}


def _gpu_clocks() -> dict:
    """SM clock (MHz) and board power (W) now, where NVML can be read (pynvml installed), else {}: a step
    much slower than its peers at a lower clock was throttled, not slowed by the code."""
    try:
        return {"sm_clock_mhz": torch.cuda.clock_rate(), "power_w": torch.cuda.power_draw() / 1000}
    except Exception:  # noqa: BLE001 - no pynvml, no NVML, or a driver that does not report these
        return {}


def make_step(model, opt, device: str, autocast: bool = True, mark=None):
    """The benchmark's training step, ``step(ids) -> loss``: forward with labels, backward, optimizer step,
    zero_grad. ``mark``, when given, is called before the step and after each of its three phases."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def step(ids):
        if mark:
            mark()
        ids = ids.to(device, non_blocking=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        if mark:
            mark()
        loss.backward()
        if mark:
            mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mark:
            mark()
        return loss.detach()

    return step


def train(model, batches, warmup: int, steps: int, lr: float, device: str, autocast: bool, on_warmed=None,
          profile_path=None, find_syncs: bool = False, stall_trace=None) -> dict:
    """Plain loop: forward with labels (loss from the model), backward, AdamW on trainable params, zero_grad.

    Warm-up steps run first and are not timed; peak memory is reset after them, so ``peak_gib`` is the
    steady-state step (including optimizer state, which exists from the first step on).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters after get_peft_model")
    opt = torch.optim.AdamW(params, lr=lr, fused=device.startswith("cuda"))
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    model.train()
    step = make_step(model, opt, device, autocast)

    t0 = time.perf_counter()
    warm_losses = [step(batches[i]) for i in range(warmup)]
    _sync(device)
    warm = {"warmup_s": time.perf_counter() - t0, "warmup_losses": [x.item() for x in warm_losses]}
    if device_type == "cuda":
        warm["warmup_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    if on_warmed:
        on_warmed(warm)
    timer, losses = common.Timer(device), []
    gc_pauses = _watch_full_collections()
    _sync(device)
    t0 = time.perf_counter()
    timer.mark()
    issue_s, counters, allocator_events = 0.0, _allocator_counters(device_type), []
    stash = sys.modules.get("pronghorn.memory.stash")  # pronghorn's stash: how many layer calls it covered
    if stash is not None:
        stash.STATS.clear()
    sampler = StallSampler() if stall_trace else None
    if sampler:
        sampler.start()
    for i in range(warmup, warmup + steps):
        t_issue = time.perf_counter()
        if sampler:
            sampler.begin_step()
        losses.append(step(batches[i]))
        if sampler:
            sampler.end_step()
        issue_s += time.perf_counter() - t_issue
        timer.mark()
        now = _allocator_counters(device_type)
        allocator_events.append({k: now[k] - counters[k] for k in now} | (_gpu_clocks() if device_type == "cuda" else {}))
        counters = now
    _sync(device)
    elapsed = time.perf_counter() - t0
    if sampler:
        sampler.stop()
        common.write_json(stall_trace, sampler.report(timer.step_seconds()))
    gc_pauses = gc_pauses()
    stash_calls = {name: dict(counts) for name, counts in stash.STATS.items()} if stash is not None else None
    peaks = {}
    if device_type == "cuda":  # read before the diagnostic steps below, which are not part of the timed run
        peaks = {"peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                 "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        graphs = sys.modules.get("pronghorn.memory.layer_graphs")
        if graphs is not None and graphs.layer_graphs_enabled():
            # Replays allocate nothing, so the allocator's peak leaves out the graphs' pool: add it.
            pool = (graphs.pool_bytes() or 0) / 2**30
            peaks.update(peak_gib=peaks["peak_gib"] + pool, graph_pool_gib=pool)
        host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        # page-locked host memory (offloaded layer inputs, host embeddings), as the caching host allocator counts it
        peaks["pinned_host_gib"] = {k: v / 2**30 for k, v in host.items() if "bytes" in k}
        # pronghorn's host embedding tables are page-locked in place (cudaHostRegister), outside those counts
        peaks["host_embedding_gib"] = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                                          if type(m).__name__ == "HostEmbedding") / 2**30
    host_syncs = common.find_host_syncs(step, batches[0]) if find_syncs and device_type == "cuda" else None
    if profile_path and device_type == "cuda":
        common.write_profile(step, batches, profile_path)
    # Host time spent issuing the steps: close to timed_s means the GPU waited on Python.
    out = dict(warm, timed_s=elapsed, host_issue_s=issue_s, full_gc_pauses_s=gc_pauses, step_s=timer.step_seconds(),
               allocator_events_per_step=allocator_events, stash_calls_in_timed_steps=stash_calls, host_syncs=host_syncs,
               losses=[x.item() for x in losses],
               trainable_params=sum(p.numel() for p in params),
               trainable_dtypes=sorted({str(p.dtype) for p in params}), **peaks)
    return out


def _peak_tflops(args) -> dict:
    if args.peak_json:
        import json

        return json.loads(Path(args.peak_json).read_text())
    return common.measure_matmul_tflops(n=8192 if args.device.startswith("cuda") else 1024, device=args.device)


def run(args) -> dict:
    """Load, warm up, time; returns the record (also written to ``args.out`` after every phase)."""
    shape = common.get_shape(args.shape)
    batch_size = args.batch_size or shape.batch_size
    seq_len = args.seq_len or shape.seq_len
    model_dir = Path(args.model_dir or f"/dev/shm/pronghorn-bench/{shape.name}")
    args.attn = args.attn or shape.hf_attn
    record = dict(kind="train_throughput", config=args.config, shape=shape.name, mode=args.mode,
                  gradient_checkpointing=("non-reentrant" if args.config in HF_CONFIGS else args.gc),
                  attn_implementation=(args.attn if args.config in HF_CONFIGS else "library default"),
                  stash_mlp_layers=args.stash_mlp_layers if args.config == "pronghorn" else None,
                  stash_residual=bool(args.stash_residual) if args.config == "pronghorn" else None,
                  batches=args.batches, cuda_graphs=args.cuda_graphs if args.config == "pronghorn" else None,
                  offload_embedding=args.offload_embedding if args.config == "pronghorn" else None,
                  graph_gates=args.graph_gates if args.config == "pronghorn" else None,
                  autocast_bf16=args.autocast, batch_size=batch_size, seq_len=seq_len, tokens_per_step=batch_size * seq_len,
                  warmup_steps=args.warmup, timed_steps=args.steps, lora_r=args.rank, lora_alpha=args.alpha,
                  target_modules=common.TARGET_MODULES, status="started", date=common.now_utc(),
                  device=common.device_name(args.device), commit=common.git_commit(args.commit),
                  argv=sys.argv[1:], shape_notes=shape.notes)
    common.write_json(args.out, record)
    try:
        if not common.checkpoint_is_current(shape, model_dir):
            raise FileNotFoundError(f"no checkpoint of shape {shape.name} at {model_dir}; build it with "
                                    f"`python benchmarks/common.py build --shape {shape.name} --dir {model_dir}`")
        t0 = time.perf_counter()
        if args.config == "unsloth":
            model = load_unsloth(args, shape, model_dir, seq_len)
        elif args.config == "pronghorn":
            model = load_pronghorn(args, shape, model_dir, seq_len)
        elif args.config == "liger":
            model = load_liger(args, shape, model_dir)
        else:
            model = load_hf_peft(args, shape, model_dir, kbit_prep=args.config == "hf_peft_kbit")
        _sync(args.device)
        record.update(status="loaded", load_s=time.perf_counter() - t0, versions=common.package_versions())
        if args.device.startswith("cuda"):
            record["model_gib"] = torch.cuda.memory_allocated() / 2**30
        common.write_json(args.out, record)

        batches = make_batches(shape.config["vocab_size"], args.warmup + args.steps, batch_size, seq_len)
        if args.batches == "pinned" and args.device.startswith("cuda"):
            batches = batches.pin_memory()

        def on_warmed(warm):
            record.update(status="warmed", **warm)
            common.write_json(args.out, record)

        result = train(model, batches, args.warmup, args.steps, args.lr, args.device, args.autocast, on_warmed,
                       profile_path=args.profile, find_syncs=args.find_syncs, stall_trace=args.stall_trace)
        record.update(result)
        record["ms_per_step"] = 1e3 * result["timed_s"] / args.steps
        record["tokens_per_s"] = batch_size * seq_len * args.steps / result["timed_s"]
        peak = _peak_tflops(args)
        flops = common.flop_counts(shape, seq_len, args.rank)
        record.update(flops=flops, peak_matmul_tflops=peak["tflops"],
                      achieved_tflops_6n=flops["flops_per_token_6n"] * record["tokens_per_s"] / 1e12,
                      achieved_tflops_lora=flops["flops_per_token_lora"] * record["tokens_per_s"] / 1e12)
        record["mfu"] = record["achieved_tflops_6n"] / peak["tflops"]
        record["mfu_lora"] = record["achieved_tflops_lora"] / peak["tflops"]
        record["status"] = "ok"
    except torch.OutOfMemoryError as e:
        record.update(status="oom", error=f"OutOfMemoryError: {str(e).splitlines()[0]}",
                      traceback=traceback.format_exc()[-4000:])
    except Exception as e:  # any failure of a third-party stack is a result to record, not a crash
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
    record.setdefault("versions", common.package_versions())
    record["finished"] = common.now_utc()
    common.write_json(args.out, record)
    return record


def _gib(x) -> str:
    return "n/a (no CUDA)" if x is None else f"{x:.2f} GiB"


def main(argv=None) -> int:
    for k, v in common.OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    args = parse_args(argv)
    rec = run(args)
    if rec["status"] == "ok":
        print(f"[{rec['config']}/{rec['mode']}] {rec['shape']} {rec['batch_size']}x{rec['seq_len']}: "
              f"{rec['tokens_per_s']:,.0f} tokens/s, {rec['ms_per_step']:.1f} ms/step, "
              f"peak {_gib(rec.get('peak_gib'))}, MFU {100 * rec['mfu']:.1f}% (6N) / "
              f"{100 * rec['mfu_lora']:.1f}% (LoRA), losses {[round(x, 4) for x in rec['losses']]}", flush=True)
        return 0
    print(f"[{rec['config']}/{rec['mode']}] {rec['status'].upper()}: {rec.get('error')}", flush=True)
    if "traceback" in rec:
        print(rec["traceback"], file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
