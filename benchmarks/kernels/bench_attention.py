"""Causal attention forward+backward on Llama-3-8B's heads (32 query, 8 key/value heads, dim 128, bf16):
which backend ``pronghorn_sdpa_varlen`` should use for rows that hold one whole sequence each.

    python benchmarks/kernels/bench_attention.py --out benchmarks/results/kernels/bench_attention.json

Rows, per shape (batch x length):

- ``varlen_flash``: torch's varlen flash kernel over the flattened stream (what padded-free packed
  batches use), with K/V repeated to the query heads where this torch's varlen has no ``enable_gqa``;
- ``sdpa_default``: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` with torch's own
  backend choice (what one-sequence rows use);
- ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient``: the same call pinned to one backend (K/V repeated
  when the backend refuses native GQA).

``first_call_ms`` is the first forward+backward at a length not seen before (cuDNN builds a plan per
shape), measured at three fresh lengths next to the first shape's; ``ms`` is the steady-state mean.

``--smoke`` runs tiny shapes on CPU (math backend only) to check the script.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import common  # benchmarks/ is a folder of scripts, not a package

HEADS, KV_HEADS, DIM = 32, 8, 128
FULL_SHAPES = [(2, 2048), (1, 16384), (1, 65536)]
SMOKE_SHAPES = [(2, 64)]
PINNED = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
          "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def _inputs(batch, length, device, heads=HEADS, kv_heads=KV_HEADS):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make(h):
        return torch.randn(batch, h, length, DIM, device=device, dtype=dtype, generator=gen).requires_grad_()

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    return q, k, v, torch.randn_like(q)


def _sdpa(backend=None):
    def run(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel(backend):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:
                rep = q.shape[1] // k.shape[1]
                k2, v2 = (t.repeat_interleave(rep, dim=1) for t in (k, v))
                return F.scaled_dot_product_attention(q, k2, v2, is_causal=True)
    return run


def _varlen(q, k, v):
    from pronghorn.nn.attention import _flat_varlen_attention, varlen_flash_kernel

    batch, _, length, _ = q.shape
    return _flat_varlen_attention(varlen_flash_kernel(), q, k, v, [[length]] * batch, None, None, None)


def _step(fn, q, k, v, do):
    out = fn(q, k, v)
    out.backward(do.view_as(out) if out.shape != do.shape else do)


def bench_shape(batch, length, device, args) -> list[dict]:
    impls = {"sdpa_default": _sdpa(), **{n: _sdpa(b) for n, b in PINNED.items()}}
    if device.type == "cuda":
        impls = {"varlen_flash": _varlen, **impls}
    rows = []
    for name, fn in impls.items():
        row = {"impl": name, "batch": batch, "length": length}
        try:
            q, k, v, do = _inputs(batch, length, device)
            firsts = []
            for extra in (1, 2, 3):  # fresh lengths: pay any per-shape plan cost
                fq, fk, fv, fdo = _inputs(batch, length + extra, device)
                common.sync(device)
                t0 = time.perf_counter()
                _step(fn, fq, fk, fv, fdo)
                common.sync(device)
                firsts.append((time.perf_counter() - t0) * 1e3)
            row["first_call_ms"] = firsts
            row["ms"] = common.time_ms(lambda: _step(fn, q, k, v, do), device, args.warmup, args.iters)
            causal_flops = 4 * batch * HEADS * length * length * DIM / 2 * 3.5  # fwd + bwd (2.5x fwd)
            row["tflops"] = causal_flops / (row["ms"] * 1e-3) / 1e12
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001  (a backend refusing a shape is a result, not a crash)
            row.update(common.failure_fields(exc))
        rows.append(row)
        print(f"{name:>15} {batch}x{length}: " + (f"{row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s, first calls "
              f"{[round(x, 1) for x in row['first_call_ms']]} ms" if row["status"] == "ok" else row["error"][-200:]))
    return rows


def main(argv=None) -> int:
    parser = common.kernel_bench_parser(__doc__)
    args = parser.parse_args(argv)
    device = common.kernel_bench_device(parser, args.smoke)
    rows = []
    for batch, length in SMOKE_SHAPES if args.smoke else FULL_SHAPES:
        rows += bench_shape(batch, length, device, args)
    common.write_json(args.out, common.envelope(device.type, benchmark="attention", smoke=args.smoke,
                                                warmup=args.warmup, iters=args.iters, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
