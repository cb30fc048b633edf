"""The LoRA-corrected gated activation (pronghorn.kernels.lora_gated) against what it replaces: two
``addmm_`` passes adding ``s (x A^T) B^T`` to the gate/up outputs, then the SwiGLU kernel.

    python benchmarks/kernels/bench_lora_gated.py --out benchmarks/results/lora_gated.json

Llama-3.1-8B MLP shape by default (2 x 2048 tokens, intermediate 14336, r=32, bf16). Forward and
backward are timed separately, each for the default tile and a few alternatives (``ROWS x BLOCK / warps``),
with GB/s over the minimal traffic (forward: g, u in, h out; backward: dh, g, u in, dg, du out).
``--smoke`` runs a tiny shape so the script can be checked on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import common  # noqa: E402

from pronghorn.kernels.lora_gated import LowRank  # noqa: E402
from pronghorn.kernels.lora_gated.triton import lora_gated_backward, lora_gated_forward  # noqa: E402
from pronghorn.kernels.swiglu.triton import swiglu_backward, swiglu_forward  # noqa: E402

TILES = [None, (32, 128, 4), (16, 256, 4), (32, 64, 4), (64, 128, 4), (16, 64, 2)]


def main() -> None:
    ap = common.kernel_bench_parser(__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    device = common.kernel_bench_device(ap, args.smoke)
    if args.smoke:
        args.tokens, args.intermediate, args.rank, args.warmup, args.iters = 32, 64, 4, 1, 2
    n, cols, r = args.tokens, args.intermediate, args.rank
    bf16 = torch.bfloat16
    g, u, dh = (torch.randn(n, cols, device=device, dtype=bf16) for _ in range(3))
    low = [LowRank(torch.randn(n, r, device=device, dtype=bf16), torch.randn(cols, r, device=device, dtype=bf16) * 0.1,
                   1.0) for _ in range(2)]
    nbytes = g.numel() * g.element_size()
    rows = []

    def add(name, pass_, fn, traffic):
        ms = common.time_ms(fn, device, args.warmup, args.iters)
        rows.append(dict(impl=name, pass_=pass_, ms=ms, gbps=traffic * nbytes / ms / 1e6))

    def unfused_forward():
        gg, uu = g.clone(), u.clone()  # stands for the GEMM outputs the addmm_ passes rewrite
        gg.addmm_(low[0].xa, low[0].B.t())
        uu.addmm_(low[1].xa, low[1].B.t())
        return swiglu_forward(gg, uu)

    def clones():
        return g.clone(), u.clone()

    add("clone g,u (subtract from unfused)", "forward", clones, 4)
    add("addmm_ x2 + swiglu", "forward", unfused_forward, 3)
    add("swiglu alone (no LoRA)", "forward", lambda: swiglu_forward(g, u), 3)
    dg, du = torch.empty_like(g), torch.empty_like(g)
    add("swiglu alone (no LoRA)", "backward", lambda: swiglu_backward(dh, g, u, dg, du), 5)
    for tile in TILES:
        name = "lora_gated " + ("default" if tile is None else "%dx%d/%dw" % tile)
        if device.type == "cpu" and tile is not None:
            continue
        add(name, "forward", lambda tile=tile: lora_gated_forward(g, u, *low, "swiglu", tile), 3)
        add(name, "backward", lambda tile=tile: lora_gated_backward(dh, g, u, dg, du, *low, "swiglu", tile), 5)
    for row in rows:
        print(f"{row['pass_']:<9}{row['impl']:<36}{row['ms']:>9.3f} ms{row['gbps']:>9.0f} GB/s")
    common.write_json(args.out, common.envelope(device, tokens=n, intermediate=cols, rank=r, rows=rows))


if __name__ == "__main__":
    main()
