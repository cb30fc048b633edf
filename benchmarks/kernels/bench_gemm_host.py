"""What one GEMM call costs the host, and what it launches, for the GEMMs of a LoRA training step.

A training step of an 8B model issues about 1,400 ``mm`` and 500 ``addmm_`` calls (the LoRA factors' small
GEMMs among them), and the device timeline shows a ``Memset`` before many of the cuBLAS kernels. For each GEMM
shape of one Llama-3.1-8B layer at 2 x 2048 tokens and each BLAS library PyTorch can pick (``cublas``,
``cublaslt``), this times the host per call (``--iters`` calls issued back to back, then one sync: the queue
never fills, so it is issue time, not device time), the device time per call, and counts the kernels and
memsets one call launches (torch.profiler).

    python benchmarks/kernels/bench_gemm_host.py --iters 40 --repeats 15 --out $OUT/gemm_host.json

(the settings of the committed ``results/kernels/bench_gemm_host.json``, whose ``calls`` field is ``--iters``).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

T, H, I, KV, R = 4096, 4096, 14336, 1024, 32


def cases(gen) -> dict:
    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen) * 0.05

    x, w, wkv, a32 = rnd(T, H), rnd(H, H), rnd(KV, H), rnd(R, H, dtype=torch.float32)
    a, b, xa, dy = rnd(3 * R, H), rnd(H, R), rnd(T, R), rnd(T, H)
    y = rnd(T, H)
    return {
        "base F.linear 4096->4096": lambda: torch.nn.functional.linear(x, w),
        "base F.linear 4096->1024": lambda: torch.nn.functional.linear(x, wkv),
        "lora A x@A^T (r=96)": lambda: x @ a.t(),
        "lora B addmm_ into y": lambda: y.addmm_(xa, b.t()),
        "dB dy^T@xa out fp32": lambda: torch.mm(dy.t(), xa, out_dtype=torch.float32),
        "t = dy@B": lambda: dy @ b,
        "dx dy@W": lambda: dy @ w,
        "cast A fp32->bf16": lambda: a32.to(torch.bfloat16),
    }


def host_us(fn, calls: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def launches(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"kernels": [n[:80] for n in names if not n.startswith("Memset")],
            "memsets": sum(n.startswith("Memset") for n in names)}


def main() -> None:
    args = common.gemm_bench_parser(__doc__).parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {}
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        for name, fn in cases(gen).items():
            for _ in range(3):
                fn()
            results[f"{library}/{name}"] = {"host_us": host_us(fn, args.iters, args.repeats),
                                            "device_us": common.time_ms(fn, "cuda", 0, args.iters) * 1e3, **launches(fn)}
            r = results[f"{library}/{name}"]
            print(f"{library:8s} {name:28s} host {r['host_us']:6.1f} us  device {r['device_us']:7.1f} us  "
                  f"memsets {r['memsets']}  kernels {r['kernels']}")
    record = {"kind": "gemm_host", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": torch.cuda.get_device_name(),
              "versions": common.package_versions(), "iters": args.iters, "repeats": args.repeats, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
