"""Device time of NF4 dequantization: pronghorn's Triton kernel against bitsandbytes' dequantize_4bit, on every
frozen weight shape of a Llama-3.1-8B decoder layer, with the GPU's own copy bandwidth as the yardstick.

    python benchmarks/kernels/bench_dequant.py --out benchmarks/results/kernels/bench_dequant.json

A QLoRA step dequantizes each weight up to three times (forward, recompute, backward), ~600 launches of 20-70 us,
so launch overhead would hide the kernels' own speed in a loop of launches: each implementation is captured
``--iters`` times into one CUDA graph and the graph's replay is timed with CUDA events (device time per call).
GB/s is over the minimal traffic (packed bytes and 8-bit scales in, bf16 out); "of copy" divides it by the
rate of a device-to-device copy of the largest weight's bf16 size, measured the same way in the same run.
Every row is checked bit-exact against bitsandbytes.

``--smoke`` runs tiny shapes so the script itself can be checked on CPU under TRITON_INTERPRET=1 (wall-clock
timing there, no graphs, no bitsandbytes GPU kernels: the reference stands in for it).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import common  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from pronghorn.kernels.dequant import dequantize_nf4  # noqa: E402
from pronghorn.kernels.dequant.reference import dequantize_nf4_reference  # noqa: E402

FULL = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
        "down_proj": (4096, 14336)}
SMOKE = {"tiny": (64, 128), "odd": (33, 65)}


def graph_ms(fn, iters: int) -> float:
    """Device milliseconds per call of ``fn``: ``iters`` calls captured in one CUDA graph, replayed and timed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the graph (compiles, allocates)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return min(times)


def _quantize(shape, device):
    """A double-quantized NF4 weight, and the dequantization to compare with (bitsandbytes on GPU; its CPU
    path is slow for odd shapes, so the reference stands in under --smoke)."""
    import bitsandbytes.functional as bnb_f

    w = torch.randn(shape, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32) * 0.02
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    if device.type == "cuda":
        return packed, state, "bitsandbytes", lambda: bnb_f.dequantize_4bit(packed, state)
    return packed, state, "reference", lambda: dequantize_nf4_reference(packed, state)


def bench(shapes: dict, device, iters: int) -> tuple[list[dict], float | None]:
    rows = []
    timer = (lambda fn: graph_ms(fn, iters)) if device.type == "cuda" else (lambda fn: common.time_ms(fn, device, 1, 2))
    largest = max(shapes.values(), key=lambda s: s[0] * s[1])
    copy_gbps = None
    if device.type == "cuda":
        src = torch.empty(largest, device=device, dtype=torch.bfloat16)
        copy_gbps = 2 * src.numel() * 2 / timer(lambda: src.clone()) / 1e6  # read + write
    for name, shape in shapes.items():
        packed, state, baseline_name, baseline = _quantize(shape, device)
        want = baseline()
        n = shape[0] * shape[1]
        nbytes = packed.numel() + state.absmax.numel() + n * want.element_size()
        for impl, fn in (("pronghorn", lambda: dequantize_nf4(packed, state)), (baseline_name, baseline)):
            ms = timer(fn)
            gbps = nbytes / ms / 1e6
            rows.append(dict(weight=name, shape=list(shape), impl=impl, ms=ms, gbps=gbps,
                             of_copy=gbps / copy_gbps if copy_gbps else None,
                             bit_exact_vs_bnb=bool(torch.equal(fn(), want))))
    return rows, copy_gbps


def main(argv=None) -> int:
    parser = common.kernel_bench_parser(__doc__)
    parser.set_defaults(iters=50)
    args = parser.parse_args(argv)
    device = common.kernel_bench_device(parser, args.smoke)
    started = time.perf_counter()
    rows, copy_gbps = bench(SMOKE if args.smoke else FULL, device, args.iters)
    elapsed = time.perf_counter() - started
    print(f"device: {common.device_name(device.type)}   copy bandwidth: {common.fmt_cell(copy_gbps, '6.0f')} GB/s")
    head = f"{'weight':<20}{'shape':<12}{'impl':<14}{'us':>8}{'GB/s':>8}{'of copy':>9}  bit-exact vs bnb"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['weight']:<20}{shape:<12}{r['impl']:<14}{r['ms'] * 1e3:8.1f}{r['gbps']:8.0f}"
              f"{common.fmt_cell(r['of_copy'], '9.2f')}  {r['bit_exact_vs_bnb']}")
    common.write_json(args.out, common.envelope(
        device.type, benchmark="dequant_nf4", smoke=args.smoke, iters=args.iters, elapsed_s=elapsed,
        copy_gbps=copy_gbps, rows=rows,
    ))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
