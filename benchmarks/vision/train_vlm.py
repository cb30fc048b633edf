"""Vision-language LoRA training throughput: pronghorn vs transformers + PEFT vs Unsloth, each in its own process.

A Qwen2.5-VL-7B-shaped model (random init, built once on disk by ``vlm_checkpoint.py``) is trained with LoRA
r=16 on the language model and the vision tower, gradient checkpointing and bf16, on batches of chat examples
with images of 448..1024 px (one row in four text-only; ``vlm_data.py``), each configuration collating them
with its own framework's collator:

* ``pronghorn``  ``pronghorn.FastVisionModel`` load + ``get_peft_model`` + ``pronghorn.trainer.VisionDataCollator``
* ``hf_peft``    ``AutoModelForImageTextToText`` (SDPA) + PEFT LoRA on the same layers + a plain processor collator,
                 non-reentrant gradient checkpointing
* ``unsloth``    ``unsloth.FastVisionModel`` + ``unsloth.trainer.UnslothVisionDataCollator`` (``resize="max"``: the
                 processor sizes the images, as in the other two)

Commands (from the repository root)::

    python benchmarks/vision/train_vlm.py build --shape qwen2.5-vl-7b --dir /root/bench/qwen2.5-vl-7b
    python benchmarks/vision/train_vlm.py run --shape qwen2.5-vl-7b --config pronghorn \\
        --model-dir /root/bench/qwen2.5-vl-7b --out $OUT/vlm/pronghorn.json
    python benchmarks/vision/train_vlm.py suite --shape qwen2.5-vl-7b --model-dir /root/bench/qwen2.5-vl-7b \\
        --out $OUT/vlm          # build if needed, every config in its own process, results.{json,md}

A ``run`` record is rewritten after every phase (started, loaded, collated, warmed, ok), so a run killed by
its timeout still shows how far it got; an exception or out-of-memory error is recorded, not raised.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import common
import vlm_checkpoint
import vlm_data

# The suite's default order: the two the bar compares first, so a cut-off run loses the HF row only.
CONFIGS = ["pronghorn", "unsloth", "hf_peft"]

# The layers every configuration adapts: the language model's attention and MLP projections, the vision
# blocks' attention (fused qkv, proj) and MLP projections, and the patch merger's two linears (pronghorn's
# and PEFT's choice; Unsloth's finetune_* switches decide its own, recorded as lora_modules).
HF_PEFT_TARGETS = (r"model\.(?:language_model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                   r"|visual\.(?:blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate|up|down)_proj)|merger\.mlp\.[02]))")
FINETUNE_SWITCHES = dict(finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
                         finetune_mlp_modules=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the random-init checkpoint and processor of a shape")
    b.add_argument("--shape", required=True, choices=sorted(vlm_checkpoint.VLM_SHAPES))
    b.add_argument("--dir", required=True)
    b.add_argument("--force", action="store_true", help="rebuild even if a current checkpoint is there")

    def workload(q):
        q.add_argument("--shape", required=True, choices=sorted(vlm_checkpoint.VLM_SHAPES))
        q.add_argument("--model-dir", required=True, help="checkpoint folder (built by `build` / `suite`)")
        q.add_argument("--batch-size", type=int, help="examples per step (default: the shape's, 4)")
        q.add_argument("--warmup", type=int, default=2, help="untimed steps first (Unsloth compiles here)")
        q.add_argument("--steps", type=int, default=5, help="timed steps")
        q.add_argument("--rank", type=int, default=16)
        q.add_argument("--alpha", type=int, default=16)
        q.add_argument("--lr", type=float, default=1e-4)
        q.add_argument("--max-seq-length", type=int, default=8192,
                       help="collators' limit; above the longest example, so nothing is truncated")
        q.add_argument("--gc", default="unsloth", choices=["unsloth", "true"],
                       help="use_gradient_checkpointing for pronghorn/unsloth (hf_peft: non-reentrant always)")
        q.add_argument("--no-autocast", dest="autocast", action="store_false",
                       help="run forward without bf16 autocast (weights are bf16 either way)")
        q.add_argument("--seed", type=int, default=1234, help="data seed (same batches in every configuration)")
        q.add_argument("--commit", help="git commit to record (default: asks git, else 'unknown')")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    r = sub.add_parser("run", help="train one configuration and write its JSON record")
    workload(r)
    r.add_argument("--config", required=True, choices=CONFIGS)
    r.add_argument("--out", required=True, help="JSON record to write")
    r.add_argument("--profile", metavar="PATH",
                   help="after timing, run 2 more steps under torch.profiler and write the kernel table here")
    s = sub.add_parser("suite", help="build if needed, then every configuration in its own process, then report")
    workload(s)
    s.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, run in this order")
    s.add_argument("--out", required=True, help="results folder (records, logs, results.json, results.md)")
    s.add_argument("--budget", type=int, default=470, help="seconds for the whole suite, build included")
    s.add_argument("--timeout", type=int, default=220, help="seconds at most per configuration")
    s.add_argument("--profile", action="store_true",
                   help="profile pronghorn after its timed steps (profiles/pronghorn.txt and .host.txt)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Loaders: each returns (PEFT model in training mode with checkpointing on, its framework's collator)
# ---------------------------------------------------------------------------------------------

def _gc_value(args):
    return "unsloth" if args.gc == "unsloth" else True


def load_pronghorn(args, model_dir):
    """pronghorn's Unsloth-compatible FastVisionModel and its VisionDataCollator."""
    from pronghorn import FastVisionModel
    from pronghorn.trainer import VisionDataCollator

    model, processor = FastVisionModel.from_pretrained(
        str(model_dir), max_seq_length=args.max_seq_length, dtype=torch.bfloat16, load_in_4bit=False,
        use_gradient_checkpointing=_gc_value(args))
    model = FastVisionModel.get_peft_model(model, **FINETUNE_SWITCHES, r=args.rank, lora_alpha=args.alpha,
                                           lora_dropout=0, bias="none", random_state=3407,
                                           use_gradient_checkpointing=_gc_value(args))
    FastVisionModel.for_training(model)
    return model, VisionDataCollator(model, processor, max_seq_length=args.max_seq_length)


def load_unsloth(args, model_dir):
    """Unsloth's FastVisionModel (imported first thing in this process, as Unsloth requires) and its collator."""
    from unsloth import FastVisionModel
    from unsloth.trainer import UnslothVisionDataCollator

    model, processor = FastVisionModel.from_pretrained(
        str(model_dir), max_seq_length=args.max_seq_length, dtype=torch.bfloat16, load_in_4bit=False,
        load_in_16bit=True, use_gradient_checkpointing=_gc_value(args))
    model = FastVisionModel.get_peft_model(model, **FINETUNE_SWITCHES, r=args.rank, lora_alpha=args.alpha,
                                           lora_dropout=0, bias="none", random_state=3407,
                                           use_gradient_checkpointing=_gc_value(args))
    FastVisionModel.for_training(model)
    # resize="max": leave image sizes to the processor, as the other configurations do (Unsloth's default
    # "min" would shrink every image to 512 px here and make its batches smaller than the others').
    collator = UnslothVisionDataCollator(model, processor, max_seq_length=args.max_seq_length, resize="max")
    return model, collator


def _hf_processor(model_dir):
    """AutoProcessor, or (where transformers cannot build the Qwen video processor: no torchvision) the same
    processor class for images and text only."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir), "AutoProcessor"
    except (OSError, ValueError, TypeError, AttributeError):
        from pronghorn.models.vision.processors import load_processor

        return load_processor(str(model_dir)), "image-only processor (no torchvision)"


class PlainVisionCollator:
    """The usual transformers recipe: chat template -> processor(text, images) -> labels = input_ids with
    padding and every vision token (image pad, vision start/end) set to -100."""

    def __init__(self, processor, model_config):
        self.processor = processor
        tok = processor.tokenizer
        tok.padding_side = "right"
        self.pad_id = tok.pad_token_id
        self.vision_ids = torch.tensor([model_config.image_token_id, model_config.video_token_id,
                                        model_config.vision_start_token_id, model_config.vision_end_token_id])

    def __call__(self, examples):
        texts = [self.processor.apply_chat_template(e["messages"], tokenize=False, add_generation_prompt=False)
                 for e in examples]
        images = [img for e in examples for img in vlm_data.example_images(e)]
        batch = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[torch.isin(labels, self.vision_ids)] = -100
        batch["labels"] = labels
        return dict(batch)


def load_hf_peft(args, model_dir):
    """transformers + PEFT, the reference recipe, with a plain processor collator."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    device_map = {"": args.device} if args.device.startswith("cuda") else None
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                        device_map=device_map)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                      target_modules=HF_PEFT_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    processor, how = _hf_processor(model_dir)
    args.processor_loader = how
    return model, PlainVisionCollator(processor, model.config)


LOADERS = {"pronghorn": load_pronghorn, "hf_peft": load_hf_peft, "unsloth": load_unsloth}


def lora_summary(model) -> dict:
    """How many LoRA-adapted linears each part of the model has (language / vision blocks / merger / other)."""
    counts = {"language": 0, "vision": 0, "merger": 0, "other": 0}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        if "merger" in name:
            counts["merger"] += 1
        elif "visual" in name:
            counts["vision"] += 1
        elif "language_model" in name:
            counts["language"] += 1
        else:
            counts["other"] += 1
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------------------
# Batches and the training loop shared by every configuration
# ---------------------------------------------------------------------------------------------

def batch_stats(batch: dict, image_token_id: int, n_images: int) -> dict:
    """What one collated batch holds: tokens (non-padding, the sequence including image tokens), text tokens
    (non-padding, non-image), image tokens, trained label tokens, padded length, images, vision patches."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    image_tokens = int(((ids == image_token_id) & real).sum())
    tokens = int(real.sum())
    grid = batch.get("image_grid_thw")
    return {"tokens": tokens, "image_tokens": image_tokens, "text_tokens": tokens - image_tokens,
            "label_tokens": int((batch["labels"] != -100).sum()), "padded_shape": list(ids.shape),
            "images": n_images, "patches": int(grid.prod(dim=-1).sum()) if grid is not None else 0}


def collate_all(collator, example_batches, image_token_id) -> tuple[list, list, float]:
    """Every batch collated up front (collation is host work, not part of the timed GPU step)."""
    t0 = time.perf_counter()
    batches, stats = [], []
    for examples in example_batches:
        batch = collator(examples)
        batches.append(batch)
        stats.append(batch_stats(batch, image_token_id, sum(len(vlm_data.example_images(e)) for e in examples)))
    return batches, stats, time.perf_counter() - t0


def _to_device(batch: dict, device: str, dtype_of_pixels) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key.startswith("pixel_values") and value.is_floating_point() and dtype_of_pixels is not None:
                value = value.to(dtype_of_pixels)
        out[key] = value
    return out


def train(model, batches, warmup: int, steps: int, lr: float, device: str, autocast: bool, on_warmed=None,
          profile_path=None) -> dict:
    """Plain loop: forward with the collator's labels (loss from the model), backward, fused AdamW over the
    trainable parameters, zero_grad. Warm-up steps are untimed; peak memory is reset after them."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters after get_peft_model")
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=lr, fused=cuda)
    device_type = "cuda" if cuda else "cpu"
    model.train()

    def step(batch):
        inputs = _to_device(batch, device, torch.bfloat16)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    warm_losses = [step(batches[i]) for i in range(warmup)]
    common.sync(device)
    warm = {"warmup_s": time.perf_counter() - t0, "warmup_losses": [x.float().item() for x in warm_losses]}
    if cuda:
        warm["warmup_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    if on_warmed:
        on_warmed(warm)
    timer, losses = common.Timer(device), []
    common.sync(device)
    t0 = time.perf_counter()
    timer.mark()
    for i in range(warmup, warmup + steps):
        losses.append(step(batches[i]))
        timer.mark()
    common.sync(device)
    out = dict(warm, timed_s=time.perf_counter() - t0, step_s=timer.step_seconds(),
               losses=[x.float().item() for x in losses], trainable_params=sum(p.numel() for p in params),
               trainable_dtypes=sorted({str(p.dtype) for p in params}))
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if profile_path:
            common.write_profile(step, batches[warmup:], profile_path)
    return out


def throughput(stats: list, step_s: list, timed_s: float) -> dict:
    """Rates over the timed steps: all tokens (text + image), text tokens, images, vision patches per second."""
    total = {k: sum(s[k] for s in stats) for k in ("tokens", "text_tokens", "image_tokens", "images", "patches",
                                                   "label_tokens")}
    return {"tokens_per_s": total["tokens"] / timed_s, "text_tokens_per_s": total["text_tokens"] / timed_s,
            "image_tokens_per_s": total["image_tokens"] / timed_s, "images_per_s": total["images"] / timed_s,
            "patches_per_s": total["patches"] / timed_s, "ms_per_step": 1e3 * timed_s / len(stats),
            "median_step_s": statistics.median(step_s), "timed_totals": total}


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------

def run(args) -> dict:
    """Load, collate, warm up, time; returns the record (also written to ``args.out`` after every phase)."""
    shape = vlm_checkpoint.get_vlm_shape(args.shape)
    batch_size = args.batch_size or shape.batch_size
    model_dir = Path(args.model_dir)
    record = dict(kind="train_vlm", config=args.config, shape=shape.name, model_dir=str(model_dir),
                  gradient_checkpointing="non-reentrant" if args.config == "hf_peft" else args.gc,
                  attn_implementation="sdpa" if args.config == "hf_peft" else "library default",
                  autocast_bf16=args.autocast, batch_size=batch_size, warmup_steps=args.warmup,
                  timed_steps=args.steps, lora_r=args.rank, lora_alpha=args.alpha, max_seq_length=args.max_seq_length,
                  image_sides=[shape.min_side, shape.max_side], row_image_counts=list(vlm_data.ROW_IMAGE_COUNTS),
                  data_seed=args.seed, status="started", date=common.now_utc(),
                  device=common.device_name("cuda" if args.device.startswith("cuda") else "cpu"),
                  commit=common.git_commit(args.commit), argv=sys.argv[1:], shape_notes=shape.notes)
    common.write_json(args.out, record)
    try:
        if not vlm_checkpoint.checkpoint_is_current(shape, model_dir):
            raise FileNotFoundError(f"no checkpoint of shape {shape.name} at {model_dir}; build it with `python "
                                    f"benchmarks/vision/train_vlm.py build --shape {shape.name} --dir {model_dir}`")
        t0 = time.perf_counter()
        model, collator = LOADERS[args.config](args, model_dir)
        common.sync(args.device)
        record.update(status="loaded", load_s=time.perf_counter() - t0, versions=versions(),
                      lora_modules=lora_summary(model), collator=type(collator).__module__ + "." +
                      type(collator).__name__)
        if getattr(args, "processor_loader", None):
            record["processor_loader"] = args.processor_loader
        if args.device.startswith("cuda"):
            record["model_gib"] = torch.cuda.memory_allocated() / 2**30
        common.write_json(args.out, record)

        examples = vlm_data.make_batches(args.warmup + args.steps, batch_size, shape.min_side, shape.max_side,
                                         seed=args.seed)
        image_token_id = model.config.image_token_id
        batches, stats, collate_s = collate_all(collator, examples, image_token_id)
        record.update(status="collated", collate_s=collate_s, batch_stats=stats)
        common.write_json(args.out, record)

        def on_warmed(warm):
            record.update(status="warmed", **warm)
            common.write_json(args.out, record)

        result = train(model, batches, args.warmup, args.steps, args.lr, args.device, args.autocast, on_warmed,
                       getattr(args, "profile", None))
        record.update(result)
        record.update(throughput(stats[args.warmup:], result["step_s"], result["timed_s"]))
        record["status"] = "ok"
    except torch.OutOfMemoryError as e:
        record.update(status="oom", error=f"OutOfMemoryError: {str(e).splitlines()[0]}",
                      traceback=traceback.format_exc()[-4000:])
    except Exception as e:  # noqa: BLE001  (any failure of a third-party stack is a result to record)
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
    record.setdefault("versions", versions())
    record["finished"] = common.now_utc()
    common.write_json(args.out, record)
    return record


def versions() -> dict:
    """``common.package_versions()`` plus torchvision (transformers needs it for Qwen-VL video processors, and
    Unsloth refuses to load a Qwen-VL processor without it)."""
    from importlib import metadata

    out = common.package_versions()
    try:
        out["torchvision"] = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        out["torchvision"] = "absent"
    return out


def _gib(x) -> str:
    return "n/a (no CUDA)" if x is None else f"{x:.2f} GiB"


def print_record(rec: dict) -> None:
    if rec["status"] == "ok":
        print(f"[{rec['config']}] {rec['shape']} batch {rec['batch_size']}: {rec['tokens_per_s']:,.0f} tokens/s "
              f"({rec['text_tokens_per_s']:,.0f} text), {rec['images_per_s']:.2f} images/s, "
              f"{rec['ms_per_step']:.0f} ms/step, peak {_gib(rec.get('peak_gib'))}, "
              f"losses {[round(x, 4) for x in rec['losses']]}", flush=True)
    else:
        print(f"[{rec['config']}] {rec['status'].upper()}: {rec.get('error')}", flush=True)


# ---------------------------------------------------------------------------------------------
# Suite: build, every configuration in its own process under a time budget, report
# ---------------------------------------------------------------------------------------------

def _workload_argv(args) -> list:
    argv = ["--shape", args.shape, "--model-dir", str(args.model_dir), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--rank", str(args.rank), "--alpha", str(args.alpha), "--lr", str(args.lr),
            "--max-seq-length", str(args.max_seq_length), "--gc", args.gc, "--seed", str(args.seed),
            "--device", args.device, "--commit", common.git_commit(args.commit)]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    if not args.autocast:
        argv.append("--no-autocast")
    return argv


def suite(args) -> int:
    """Build the checkpoint if needed, run each configuration as ``train_vlm.py run`` in its own process
    (its limit: ``--timeout`` or what the budget leaves), and rewrite the report after each."""
    import vlm_report

    start = time.monotonic()
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shape = vlm_checkpoint.get_vlm_shape(args.shape)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {CONFIGS}")

    def log(msg):
        line = f"[suite {time.monotonic() - start:5.0f}s] {msg}"
        print(line, flush=True)
        with open(logs / "suite.log", "a") as fh:
            fh.write(line + "\n")

    log(f"shape={shape.name} configs={configs} budget={args.budget}s out={out} versions={versions()}")
    if importlib.util.find_spec("PIL") is None:
        log("Pillow is not importable, so no image can be made: add it to .gpu_site "
            "(bash /work/shared/gpu/make_gpu_site.sh .gpu_site --with-unsloth pillow==<version>) and rerun")
        return 2
    env = dict(os.environ, **common.OFFLINE_ENV, PYTHONUNBUFFERED="1")
    # The build runs in its own process too, so this one never holds GPU memory while the configurations run.
    build_cmd = [sys.executable, str(Path(__file__).resolve()), "build", "--shape", shape.name, "--dir",
                 str(args.model_dir)]
    t0 = time.monotonic()
    with open(logs / "build.log", "w") as fh:
        try:
            rc = subprocess.run(build_cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                timeout=max(args.budget - 90, 30), check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    log(f"checkpoint build finished: exit code {rc} in {time.monotonic() - t0:.0f}s (see logs/build.log)")
    common.write_json(out / "build.json", {"shape": shape.name, "model_dir": str(args.model_dir), "exit_code": rc,
                                           "seconds": time.monotonic() - t0, "date": common.now_utc(),
                                           "log": (logs / "build.log").read_text()[-3000:]})
    if rc != 0:
        log("checkpoint build failed; no configuration can run")
        return 1
    for config in configs:
        left = args.budget - (time.monotonic() - start) - 10
        limit = int(min(args.timeout, left))
        if limit < 30:
            log(f"skipping {config}: only {left:.0f}s of the budget left")
            continue
        record_path = out / f"{config}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--config", config, "--out", str(record_path),
               *_workload_argv(args)]
        if args.profile and config == "pronghorn":
            (out / "profiles").mkdir(exist_ok=True)
            cmd += ["--profile", str(out / "profiles" / "pronghorn.txt")]
        log(f"running {config} (limit {limit}s)")
        with open(logs / f"{config}.log", "w") as fh:
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=limit, check=False).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
                vlm_report.mark_timeout(record_path, limit)
        log(f"{config} finished: {rc}")
        vlm_report.write_report(out)
    summary = vlm_report.write_report(out)
    print(summary, flush=True)
    log(f"done; {out / 'results.md'}")
    return 0


def main(argv=None) -> int:
    for key, value in common.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    if args.cmd == "build":
        shape = vlm_checkpoint.get_vlm_shape(args.shape)
        timings = vlm_checkpoint.ensure_checkpoint(shape, args.dir, force=args.force)
        print(f"checkpoint for {shape.name} already at {args.dir}; reused" if timings is None else
              f"built {shape.name} ({timings['n_params'] / 1e9:.2f} B params) at {args.dir}: {timings}", flush=True)
        return 0
    if args.cmd == "suite":
        return suite(args)
    rec = run(args)
    print_record(rec)
    if rec["status"] != "ok" and "traceback" in rec:
        print(rec["traceback"], file=sys.stderr, flush=True)
    return 0 if rec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
