"""Where should a LoRA projection add its low-rank term: after the base GEMM, or inside it (``beta=1``)?

Times, on the GPU, one Llama-3.1-8B layer's LoRA projections at 2 x 2048 tokens in bf16, r=32, two ways:

* ``after``: the base GEMM writes ``y = x W^T``, then ``y.addmm_(xa, B^T)`` reads and writes ``y`` again
  (what pronghorn's projections did up to this benchmark);
* ``inside``: the small GEMM writes ``y = xa B^T`` first and the base GEMM accumulates onto it
  (``y.addmm_(x, W^T)``, cuBLAS's ``beta=1`` epilogue), so ``y`` makes one trip less through memory.

The same two orders are timed for input gradients ``dx = dy W + t A`` (``t = s dy B``). Device time per
call from CUDA events over ``--iters`` back-to-back calls, median of ``--repeats``.

    python benchmarks/kernels/bench_lora_epilogue.py --out $OUT/lora_epilogue.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

TOKENS, HIDDEN, INTER, KV, RANK = 4096, 4096, 14336, 1024, 32
# (name, in, out) of the frozen projections whose output is written by a GEMM (gate/up add theirs in the
# activation kernel instead)
PROJECTIONS = [("q/o", HIDDEN, HIDDEN), ("k/v", HIDDEN, KV), ("down", INTER, HIDDEN)]
# (name, out, in) of input gradients dx [tokens, in] = dy [tokens, out] @ W [out, in] (+ t A)
INPUT_GRADS = [("o (dx of attn)", HIDDEN, HIDDEN), ("down (dh)", HIDDEN, INTER), ("gate (dx)", INTER, HIDDEN)]


def _randn(*shape, gen):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05


def forward_cases(n_in: int, n_out: int, gen) -> dict:
    x, w = _randn(TOKENS, n_in, gen=gen), _randn(n_out, n_in, gen=gen)
    xa, b = _randn(TOKENS, RANK, gen=gen), _randn(n_out, RANK, gen=gen)

    def after():
        y = x @ w.t()
        return y.addmm_(xa, b.t())

    def inside():
        y = xa @ b.t()
        return y.addmm_(x, w.t())

    return {"base GEMM alone": lambda: x @ w.t(), "after": after, "inside": inside,
            "max |after - inside|": (after, inside)}


def input_grad_cases(n_out: int, n_in: int, gen) -> dict:
    dy, w = _randn(TOKENS, n_out, gen=gen), _randn(n_out, n_in, gen=gen)
    t, a = _randn(TOKENS, RANK, gen=gen), _randn(RANK, n_in, gen=gen)

    def after():
        dx = dy @ w
        return dx.addmm_(t, a)

    def inside():
        dx = t @ a
        return dx.addmm_(dy, w)

    return {"base GEMM alone": lambda: dy @ w, "after": after, "inside": inside,
            "max |after - inside|": (after, inside)}


def measure(cases: dict, iters: int, repeats: int) -> dict:
    row = {}
    for label, fn in cases.items():
        if isinstance(fn, tuple):
            row[label] = (fn[0]().float() - fn[1]().float()).abs().max().item()
        else:
            row[label + " ms"] = common.median_device_ms(fn, iters, repeats)
    row["inside vs after"] = row["after ms"] / row["inside ms"]
    return row


def main(argv=None) -> int:
    args = common.gemm_bench_parser(__doc__).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_lora_epilogue.py times cuBLAS on a GPU; no CUDA device here")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = {}
    for name, n_in, n_out in PROJECTIONS:
        rows[f"forward {name}"] = measure(forward_cases(n_in, n_out, gen), args.iters, args.repeats)
    for name, n_out, n_in in INPUT_GRADS:
        rows[f"input grad {name}"] = measure(input_grad_cases(n_out, n_in, gen), args.iters, args.repeats)
    record = {"date": common.now_utc(), "device": common.device_name(), "versions": common.package_versions(),
              "commit": common.git_commit(), "tokens": TOKENS, "rank": RANK, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))
    for name, row in rows.items():
        print(f"{name:24s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
