"""Would storing gate/up (and q/k/v) base weights as one matrix make their GEMMs faster?

Times, on the GPU, the frozen-weight GEMMs of one Llama-3.1-8B layer at 2 x 2048 tokens in bf16: forward
``x W^T`` and input gradient ``dy W`` for gate/up and q/k/v, each as separate GEMMs (what pronghorn runs now:
one GEMM per projection, the input gradients summed with ``addmm_``) and as one GEMM against the
concatenated weight (what a fused storage layout would allow). Device time per call from CUDA events over
``--iters`` back-to-back calls, median of ``--repeats``.

    python benchmarks/kernels/bench_grouped_gemm.py --out $OUT/grouped_gemm.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def group_cases(tokens: int, hidden: int, widths: list[int]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(w, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for w in widths]
    w_cat = torch.cat(ws)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    dys = [torch.randn(tokens, w, device="cuda", dtype=torch.bfloat16, generator=gen) for w in widths]
    dy_cat = torch.cat(dys, dim=1)

    def fwd_separate():
        return [x @ w.t() for w in ws]

    def bwd_separate():
        dx = dys[0] @ ws[0]
        for dy, w in zip(dys[1:], ws[1:]):
            dx.addmm_(dy, w)
        return dx

    return {"forward_separate": fwd_separate, "forward_one_gemm": lambda: x @ w_cat.t(),
            "input_grad_separate": bwd_separate, "input_grad_one_gemm": lambda: dy_cat @ w_cat}


def main(argv=None) -> int:
    args = common.gemm_bench_parser(__doc__).parse_args(argv)
    tokens, hidden, inter, kv = 4096, 4096, 14336, 1024
    groups = {"gate_up": [inter, inter], "qkv": [hidden, kv, kv]}
    results = {}
    for name, widths in groups.items():
        for case, fn in group_cases(tokens, hidden, widths).items():
            ms = common.median_device_ms(fn, args.iters, args.repeats)
            flops = 2 * tokens * hidden * sum(widths)
            results[f"{name}/{case}"] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
            print(f"{name:8s} {case:22s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
    record = {"kind": "grouped_gemm", "date": common.now_utc(), "device": common.device_name(),
              "versions": common.package_versions(), "tokens": tokens, "hidden": hidden, "intermediate": inter,
              "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
