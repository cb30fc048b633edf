"""Forward+backward time and peak memory of pronghorn's fused gated activations (SwiGLU, GeGLU)
and fused LM-head cross-entropy against the PyTorch references the parity tests use, run eagerly
and through ``torch.compile``.

    python benchmarks/kernels/bench_act_ce.py --out benchmarks/results/act_ce.json

Shapes (default): activations on Llama-3-8B's MLP, 8192 tokens x 14336 bf16; cross-entropy with
the Llama-3 vocabulary, 4096 tokens x hidden 4096 x vocab 128256 bf16, once with a trainable LM
head (full fine-tuning) and once frozen (LoRA). Activation rows also give GB/s against the
minimal traffic (forward reads gate and up and writes h; backward reads dh, gate, up and writes
dgate, dup). The activation inputs are leaf tensors, so pronghorn's in-place backward (which only
applies to fresh projection outputs) is not in play and its peak memory here is the allocating
one. The ``pronghorn_token_stats`` cross-entropy row also measures the token accuracy and entropy
that SFTTrainer logs (``token_stats_out``). Takes well under two minutes on an H100, most of it
compiling the references.

``--smoke`` runs tiny shapes so the script itself can be checked on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import common  # benchmarks/ is a folder of scripts, not a package

from pronghorn.kernels.cross_entropy import fused_linear_cross_entropy
from pronghorn.kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
from pronghorn.kernels.geglu import geglu
from pronghorn.kernels.geglu.reference import geglu_reference
from pronghorn.kernels.swiglu import swiglu
from pronghorn.kernels.swiglu.reference import swiglu_reference

FULL = {"act_tokens": 8192, "intermediate": 14336, "ce_tokens": 4096, "hidden": 4096, "vocab": 128256}
SMOKE = {"act_tokens": 64, "intermediate": 300, "ce_tokens": 40, "hidden": 16, "vocab": 1000}


def _compiled(fn, enabled: bool):
    return torch.compile(fn, dynamic=False) if enabled else None


# ------------------------------------------------------------------------------------ activations


def bench_activation(name, ours, reference, hf_eager, shape, device, args) -> list[dict]:
    tokens, inter = shape
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    gate = torch.randn(tokens, inter, device=device, dtype=dtype, generator=gen).requires_grad_()
    up = torch.randn(tokens, inter, device=device, dtype=dtype, generator=gen).requires_grad_()
    dh = torch.randn(tokens, inter, device=device, dtype=dtype, generator=gen)
    n, size = tokens * inter, torch.finfo(dtype).bits // 8
    fwd_bytes, bwd_bytes = 3 * n * size, 5 * n * size
    impls = {"pronghorn": ours, "reference_eager": reference, "hf_eager_bf16": hf_eager,
             "reference_compile": _compiled(reference, args.compile)}
    rows = []
    for impl, fn in impls.items():
        if fn is None:
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                fn(gate, up)

        def fwd_bwd(fn=fn):
            fn(gate, up).backward(dh)
            gate.grad = up.grad = None

        row = {"op": name, "impl": impl, "shape": [tokens, inter], "dtype": str(dtype)}
        try:
            if impl != "reference_compile":  # a no-grad call would be one more compilation
                row["fwd_ms"] = common.time_ms(fwd, device, args.warmup, args.iters)
            row["fwd_bwd_ms"] = common.time_ms(fwd_bwd, device, args.warmup, args.iters)
        except RuntimeError as exc:  # a reference that fails to compile is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        row["peak_mib"] = common.peak_mib(fwd_bwd, device)
        if "fwd_ms" in row:
            row["fwd_gbps"] = fwd_bytes / row["fwd_ms"] / 1e6
        row["fwd_bwd_gbps"] = (fwd_bytes + bwd_bytes) / row["fwd_bwd_ms"] / 1e6
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- cross-entropy


def bench_cross_entropy(shape, device, args, train_weight: bool) -> list[dict]:
    tokens, hid, vocab = shape
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hid, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hid, device=device, dtype=dtype, generator=gen) / hid ** 0.5)
    weight.requires_grad_(train_weight)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    labels[::10] = -100
    matmuls = 3 if train_weight else 2
    flops = 2 * tokens * hid * vocab * matmuls
    stats = torch.zeros(3, device=device)
    impls = {"pronghorn": fused_linear_cross_entropy,
             # what SFTTrainer runs: the same loss plus the token accuracy / entropy it logs
             "pronghorn_token_stats": lambda h, w, y: fused_linear_cross_entropy(h, w, y, token_stats_out=stats),
             "reference_eager": fused_linear_cross_entropy_reference,
             "reference_compile": _compiled(fused_linear_cross_entropy_reference, args.compile)}
    with torch.no_grad():
        want = fused_linear_cross_entropy_reference(hidden, weight, labels).item()
    rows = []
    for impl, fn in impls.items():
        if fn is None:
            continue

        def fwd_bwd(fn=fn):
            loss = fn(hidden, weight, labels)
            loss.backward()
            hidden.grad = weight.grad = None
            return loss

        row = {"op": "linear_cross_entropy", "impl": impl, "lm_head": "trainable" if train_weight else "frozen",
                   "shape": [tokens, hid, vocab], "dtype": str(dtype)}
        try:
            row["loss_minus_reference"] = fwd_bwd().item() - want
            row["fwd_bwd_ms"] = common.time_ms(fwd_bwd, device, args.warmup, args.iters)
        except RuntimeError as exc:  # e.g. the materialised reference running out of memory
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        row["peak_mib"] = common.peak_mib(fwd_bwd, device)
        row["tflops"] = flops / row["fwd_bwd_ms"] / 1e9
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ report


def print_table(rows: list[dict]) -> None:
    head = f"{'op':<22}{'impl':<23}{'head':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}{'x eager':>9}{'peak MiB':>10}" \
           f"{'GB/s':>8}{'TFLOP/s':>9}"
    print(head)
    print("-" * len(head))
    eager = {(r["op"], r.get("lm_head")): r.get("fwd_bwd_ms") for r in rows if r["impl"] == "reference_eager"}
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<22}{r['impl']:<23}{r.get('lm_head', ''):<10}  error: {r['error'][:80]}")
            continue
        base = eager.get((r["op"], r.get("lm_head")))
        speedup = base / r["fwd_bwd_ms"] if base else None
        cell = common.fmt_cell
        print(f"{r['op']:<22}{r['impl']:<23}{r.get('lm_head', ''):<10}{cell(r.get('fwd_ms'), '9.3f')}"
              f"{cell(r['fwd_bwd_ms'], '12.3f')}{cell(speedup, '9.2f')}{cell(r['peak_mib'], '10.0f')}"
              f"{cell(r.get('fwd_bwd_gbps'), '8.0f')}{cell(r.get('tflops'), '9.0f')}")


def main(argv=None) -> int:
    parser = common.kernel_bench_parser(__doc__)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile rows")
    args = parser.parse_args(argv)
    device = common.kernel_bench_device(parser, args.smoke)
    shapes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    act_shape = (shapes["act_tokens"], shapes["intermediate"])
    rows = bench_activation("swiglu", swiglu, swiglu_reference, lambda g, u: F.silu(g) * u, act_shape, device, args)
    rows += bench_activation(
        "geglu_tanh", geglu, geglu_reference, lambda g, u: F.gelu(g, approximate="tanh") * u, act_shape, device, args)
    ce_shape = (shapes["ce_tokens"], shapes["hidden"], shapes["vocab"])
    for train_weight in (True, False):
        rows += bench_cross_entropy(ce_shape, device, args, train_weight)
    elapsed = time.perf_counter() - started

    print(f"device: {common.device_name(device.type)}   elapsed: {elapsed:.1f}s")
    print_table(rows)
    common.write_json(args.out, common.envelope(
        device.type, benchmark="act_ce", smoke=args.smoke, warmup=args.warmup, iters=args.iters,
        elapsed_s=elapsed, rows=rows,
    ))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
