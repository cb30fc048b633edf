"""Time save_pretrained_merged(merged_16bit) and save_pretrained_gguf(q8_0) on an 8B-shaped LoRA model.

Builds a Llama-3.1-8B-shaped model with random weights (bf16, on the GPU when there is one), wraps
it in LoRA (r=16 on all linear layers, random non-zero B), and records wall time and peak host RAM
(max RSS) of each export. Run on the GPU machine:

    python benchmarks/export/bench_export.py --out benchmarks/results/export.json --workdir /tmp/bench_export
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LLAMA31_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                  "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                  "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # ru_maxrss is KiB on Linux


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def build_model(layers: int, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA31_8B, "num_hidden_layers": layers})
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)   # built in bf16: no fp32 peak
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--workdir", default="/tmp/pronghorn_bench_export", help="where exports are written")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real 8B shape)")
    parser.add_argument("--keep", action="store_true", help="keep the exported files")
    args = parser.parse_args()

    from pronghorn.export.gguf.save import save_pretrained_gguf
    from pronghorn.export.save import save_pretrained_merged
    from tests.factories import byte_bpe_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    model = build_model(args.layers, device)
    # The benchmark measures weight export; a small offline tokenizer padded to 128256 ids stands in.
    tok = byte_bpe_tokenizer()
    build_s = time.perf_counter() - t0
    rss_after_build = _current_rss_gib()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": device,
                   "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                   "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "layers": args.layers, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
                   "build_s": round(build_s, 1), "rss_after_build_gib": round(rss_after_build, 2), "runs": {}}
    for name, fn in (
        ("merged_16bit", lambda: save_pretrained_merged(model, workdir / "merged", tok, "merged_16bit")),
        ("gguf_q8_0", lambda: save_pretrained_gguf(model, workdir / "gguf", tok, "q8_0", ollama=False)),
    ):
        if device == "cuda":
            torch.cuda.synchronize()
        start_peak = _rss_gib()
        t = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t
        out_dir = workdir / ("merged" if name == "merged_16bit" else "gguf")
        size = sum(p.stat().st_size for p in out_dir.iterdir())
        results["runs"][name] = {"seconds": round(elapsed, 1), "output_gib": round(size / 2**30, 2),
                                     "peak_rss_gib": round(_rss_gib(), 2), "peak_rss_before_gib": round(start_peak, 2),
                                     "write_gib_per_s": round(size / 2**30 / elapsed, 2)}
        print(name, results["runs"][name], flush=True)
        if not args.keep:
            shutil.rmtree(out_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
