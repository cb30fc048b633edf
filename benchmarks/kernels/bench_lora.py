"""Fused LoRA projections (pronghorn.kernels.lora via pronghorn.nn.lora) against PEFT's eager LoRA layers,
and the NF4 dequantization kernel against bitsandbytes' dequantize_4bit.

    python benchmarks/kernels/bench_lora.py --out benchmarks/results/lora.json

Shapes (default): Llama-3.1-8B, 2 x 2048 tokens, hidden 4096, intermediate 14336, q/o 4096x4096, k/v
1024x4096 (8 KV heads), LoRA r=32, alpha 32, dropout 0 on every projection, bf16 autocast as in training.
Bases: ``bf16`` (dense) and ``nf4`` (bitsandbytes Linear4bit, double quantization, bf16 compute).

Per block (MLP, q/k/v, o) and implementation: forward+backward milliseconds, the memory the forward leaves
saved for backward ("saved MiB", what gradient checkpointing does not get back within a layer) and the peak
above the inputs during forward+backward. Implementations: ``peft_eager`` (the PEFT modules' own forward),
``pronghorn`` (the fused path), ``reference`` (pronghorn's plain-PyTorch reference that the tests use).
Dequantization rows give GB/s over the minimal traffic (packed bytes + scales in, bf16 out) and whether
the result is bit-identical to bitsandbytes'. Takes well under two minutes on an H100.

``--smoke`` runs tiny shapes so the script itself can be checked on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import common  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from pronghorn.kernels.dequant import dequantize_nf4  # noqa: E402
from pronghorn.kernels.dequant.reference import dequantize_nf4_reference  # noqa: E402
from pronghorn.kernels.lora.reference import (  # noqa: E402
    lora_linear_reference, lora_mlp_reference, lora_qkv_reference,
)
from pronghorn.nn.lora import fused_mlp_forward, fused_o_forward, fused_qkv_forward, lora_parts  # noqa: E402

FULL = dict(batch=2, seq=2048, hidden=4096, intermediate=14336, q=4096, kv=1024, r=32)
SMOKE = dict(batch=2, seq=16, hidden=64, intermediate=128, q=64, kv=32, r=4)


class GatedMLP(nn.Module):
    """Llama's MLP layout (gate_proj, up_proj, down_proj, SiLU)."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Projections(nn.Module):
    """Llama's attention projections (the attention itself is not part of this benchmark)."""

    def __init__(self, hidden, q, kv):
        super().__init__()
        self.q_proj = nn.Linear(hidden, q, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(q, hidden, bias=False)


def _quantize_linears(module: nn.Module, device) -> None:
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)
            setattr(module, name, layer.to(device))  # moving to the device quantizes


def build(mode: str, s: dict, device) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    root = nn.Module()
    with torch.device(device):
        root.mlp = GatedMLP(s["hidden"], s["intermediate"]).to(torch.bfloat16)
        root.attn = Projections(s["hidden"], s["q"], s["kv"]).to(torch.bfloat16)
    for m in root.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    if mode == "nf4":
        _quantize_linears(root.mlp, device)
        _quantize_linears(root.attn, device)
        root.is_loaded_in_4bit = True  # what transformers sets; PEFT then uses its bitsandbytes LoRA layers
    cfg = LoraConfig(r=s["r"], lora_alpha=s["r"], lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(root, cfg).base_model.model
    if any(lora_parts(m) is None for m in (model.mlp.gate_proj, model.attn.q_proj)):
        raise RuntimeError(f"lora_parts declined the {mode} PEFT layers: the benchmark would time the fallback")
    return model.mlp, model.attn


def _parts(m):
    return tuple(lora_parts(m))


def memory_mib(forward, device) -> tuple[float | None, float | None]:
    """(memory held after forward = saved for backward + outputs, peak during forward+backward), MiB."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = forward()
    torch.cuda.synchronize()
    saved = (torch.cuda.memory_allocated() - base) / 2**20
    loss.backward()
    torch.cuda.synchronize()
    return saved, (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_blocks(mode, s, device, args) -> list[dict]:
    mlp, attn = build(mode, s, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(s["batch"], s["seq"], s["hidden"], device=device, dtype=torch.bfloat16, generator=gen)
    x.requires_grad_()
    params = [p for p in list(mlp.parameters()) + list(attn.parameters()) if p.requires_grad]
    blocks = {
        "mlp": {
            "peft_eager": lambda t: mlp(t),
            "pronghorn": lambda t: fused_mlp_forward(mlp, t, "swiglu"),
            "reference": lambda t: lora_mlp_reference(t, _parts(mlp.gate_proj), _parts(mlp.up_proj),
                                                      _parts(mlp.down_proj), "swiglu"),
        },
        "qkv": {
            "peft_eager": lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)),
            "pronghorn": lambda t: fused_qkv_forward(attn, t),
            "reference": lambda t: lora_qkv_reference(t, _parts(attn.q_proj), _parts(attn.k_proj),
                                                      _parts(attn.v_proj)),
        },
        "o": {
            "peft_eager": lambda t: attn.o_proj(t),
            "pronghorn": lambda t: fused_o_forward(attn, t),
            "reference": lambda t: lora_linear_reference(t, *_parts(attn.o_proj)),
        },
    }
    rows = []
    for block, impls in blocks.items():
        for impl, fn in impls.items():

            def forward(fn=fn):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = fn(x)
                out = out if isinstance(out, tuple) else (out,)
                # sum of squares-free scalar whose gradient is all ones on every output
                return sum(o.float().sum() for o in out)

            def fwd_bwd(forward=forward):
                forward().backward()
                x.grad = None
                for p in params:
                    p.grad = None

            row = dict(block=block, base=mode, impl=impl, tokens=s["batch"] * s["seq"], hidden=s["hidden"],
                       intermediate=s["intermediate"], r=s["r"])
            row["fwd_bwd_ms"] = common.time_ms(fwd_bwd, device, args.warmup, args.iters)
            saved, peak = memory_mib(forward, device)
            x.grad = None
            for p in params:
                p.grad = None
            row["saved_mib"], row["peak_mib"] = saved, peak
            rows.append(row)
    return rows


def bench_dequant(s, device, args) -> list[dict]:
    import bitsandbytes.functional as bnb_f

    rows = []
    for shape in ((s["intermediate"], s["hidden"]), (s["hidden"], s["hidden"])):
        w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        n = w.numel()
        nbytes = packed.numel() + state.absmax.numel() + n * 2  # packed in, 8-bit scales in, bf16 out
        want = bnb_f.dequantize_4bit(packed, state)
        impls = {"pronghorn": lambda: dequantize_nf4(packed, state),
                 "bitsandbytes": lambda: bnb_f.dequantize_4bit(packed, state),
                 "reference": lambda: dequantize_nf4_reference(packed, state)}
        for impl, fn in impls.items():
            ms = common.time_ms(fn, device, args.warmup, args.iters)
            rows.append(dict(block="dequant_nf4", impl=impl, shape=list(shape), dtype="bfloat16", ms=ms,
                             gbps=nbytes / ms / 1e6, bit_exact_vs_bnb=bool(torch.equal(fn(), want))))
    return rows


def print_table(rows) -> None:
    head = f"{'block':<8}{'base':<6}{'impl':<12}{'fwd+bwd ms':>12}{'x peft':>8}{'saved MiB':>11}{'peak MiB':>10}"
    print(head + "\n" + "-" * len(head))
    eager = {(r["block"], r["base"]): r["fwd_bwd_ms"] for r in rows if r.get("impl") == "peft_eager"}
    for r in rows:
        if r["block"] == "dequant_nf4":
            continue
        speed = eager[(r["block"], r["base"])] / r["fwd_bwd_ms"]
        print(f"{r['block']:<8}{r['base']:<6}{r['impl']:<12}{r['fwd_bwd_ms']:12.3f}{speed:8.2f}"
              f"{common.fmt_cell(r['saved_mib'], '11.0f')}{common.fmt_cell(r['peak_mib'], '10.0f')}")
    head = f"{'dequant shape':<16}{'impl':<14}{'ms':>9}{'GB/s':>9}  bit-exact vs bnb"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if r["block"] == "dequant_nf4":
            shape = "x".join(map(str, r["shape"]))
            print(f"{shape:<16}{r['impl']:<14}{r['ms']:9.3f}{r['gbps']:9.0f}  {r['bit_exact_vs_bnb']}")


def main(argv=None) -> int:
    parser = common.kernel_bench_parser(__doc__)
    args = parser.parse_args(argv)
    device = common.kernel_bench_device(parser, args.smoke)
    s = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    rows = []
    for mode in ("bf16", "nf4"):
        rows += bench_blocks(mode, s, device, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += bench_dequant(s, device, args)
    elapsed = time.perf_counter() - started
    print(f"device: {common.device_name(device.type)}   elapsed: {elapsed:.1f}s")
    print_table(rows)
    common.write_json(args.out, common.envelope(
        device.type, benchmark="lora", smoke=args.smoke, shapes=s, warmup=args.warmup, iters=args.iters,
        elapsed_s=elapsed, rows=rows,
    ))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
