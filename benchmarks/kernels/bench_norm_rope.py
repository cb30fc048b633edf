"""Benchmark RMSNorm, LayerNorm and RoPE kernels against the PyTorch references (eager and compiled).

Times forward (with autograd recording, as in training) and forward+backward of each implementation,
reports achieved bandwidth computed from the minimal bytes each op must move, prints a table and
writes JSON (with date, device, versions).

    python benchmarks/kernels/bench_norm_rope.py --out results.json          # on a CUDA GPU, < 2 min
    python benchmarks/kernels/bench_norm_rope.py --smoke --out smoke.json    # CPU, tiny, interpreter

The references are the same ones the parity tests use.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import common  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import torch  # noqa: E402


def _timer(device: str, warmup: int, rep: int):
    """Median milliseconds of ``fn()`` (do_bench on GPU: warm-up, L2 flush, CUDA events)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]

    return cpu_time


def _fwd_bwd(fn, inputs, grad_outputs):
    """A closure running forward then backward with ``autograd.grad`` (no accumulation kernels)."""

    def run():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, inputs, grad_outputs)

    return run


def _cases(device: str, dtype: torch.dtype, smoke: bool):
    from pronghorn.kernels.layer_norm import layer_norm
    from pronghorn.kernels.layer_norm.reference import layer_norm_reference
    from pronghorn.kernels.rms_norm import rms_norm
    from pronghorn.kernels.rms_norm.reference import rms_norm_reference
    from pronghorn.kernels.rope import apply_rope
    from pronghorn.kernels.rope.reference import rope_reference

    esize = torch.finfo(dtype).bits // 8
    norm_shapes = [(2, 16, 32)] if smoke else [(4, 4096, 4096), (2, 2048, 8192)]
    for shape in norm_shapes:
        numel, hidden = torch.Size(shape).numel(), shape[-1]
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(hidden, device=device, dtype=dtype) * 0.1 + 1).requires_grad_(True)
        b = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(shape, device=device, dtype=dtype)
        # Minimal traffic: forward reads x, writes y; backward reads dy and x, writes dx (params are tiny).
        fwd_bytes, fb_bytes = 2 * numel * esize, 5 * numel * esize
        yield dict(
            op="rms_norm", shape=list(shape), inputs=(x, w), grads=(dy,), fwd_bytes=fwd_bytes, fb_bytes=fb_bytes,
            kernel=lambda x, w: rms_norm(x, w, 1e-6, 0.0, "llama"),
            reference=lambda x, w: rms_norm_reference(x, w, 1e-6, 0.0, "llama"),
        )
        yield dict(
            op="layer_norm", shape=list(shape), inputs=(x, w, b), grads=(dy,),
            fwd_bytes=fwd_bytes, fb_bytes=fb_bytes,
            kernel=lambda x, w, b: layer_norm(x, w, b, 1e-5),
            reference=lambda x, w, b: layer_norm_reference(x, w, b, 1e-5),
        )
    rope_shapes = [(1, 3, 4, 2, 16)] if smoke else [(4, 2048, 32, 8, 128), (1, 8192, 28, 4, 128)]
    for batch, seq, hq, hk, d in rope_shapes:
        q_proj = torch.randn(batch, seq, hq * d, device=device, dtype=dtype, requires_grad=True)
        k_proj = torch.randn(batch, seq, hk * d, device=device, dtype=dtype, requires_grad=True)
        pos = torch.arange(seq, device=device, dtype=torch.float32)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        freqs = torch.outer(pos, inv)
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        gq = torch.randn(batch, hq, seq, d, device=device, dtype=dtype)
        gk = torch.randn(batch, hk, seq, d, device=device, dtype=dtype)
        qk_numel = batch * seq * (hq + hk) * d
        cs_bytes = 2 * cos.numel() * esize
        # Q and K read and written once each way; cos/sin read once per pass.
        fwd_bytes = 2 * qk_numel * esize + cs_bytes
        fb_bytes = 2 * fwd_bytes

        def views(qp, kp, batch=batch, seq=seq, hq=hq, hk=hk, d=d):
            return qp.view(batch, seq, hq, d).transpose(1, 2), kp.view(batch, seq, hk, d).transpose(1, 2)

        yield dict(
            op="rope", shape=[batch, seq, hq, hk, d], inputs=(q_proj, k_proj), grads=(gq, gk),
            fwd_bytes=fwd_bytes, fb_bytes=fb_bytes,
            kernel=lambda qp, kp, views=views, cos=cos, sin=sin: apply_rope(
                *views(qp, kp), cos, sin, inplace_backward=True
            ),
            reference=lambda qp, kp, views=views, cos=cos, sin=sin: rope_reference(*views(qp, kp), cos, sin),
        )


def _max_err(a, b) -> float:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results file")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    args = parser.parse_args(argv)

    if args.smoke:
        # The interpreter must be on before the kernel modules (imported lazily on first call) load.
        os.environ["TRITON_INTERPRET"] = "1"
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("no CUDA device: run on a GPU, or pass --smoke for a CPU check of the script")
    dtype = getattr(torch, args.dtype)
    time_ms = _timer(device, warmup=10, rep=40)
    torch.manual_seed(0)

    rows = []
    started = time.perf_counter()
    for case in _cases(device, dtype, args.smoke):
        inputs, grads = case["inputs"], case["grads"]
        impls = {"pronghorn": case["kernel"], "eager": case["reference"]}
        if not args.no_compile:
            impls["compiled"] = torch.compile(case["reference"], dynamic=False)
        expected = case["reference"](*inputs)
        for name, fn in impls.items():
            label = f"{case['op']} {case['shape']} {name}"
            print(f"[{time.perf_counter() - started:6.1f}s] {label}", flush=True)
            try:
                out = fn(*inputs)  # warm-up; compiles where needed
                torch.autograd.grad(out if isinstance(out, tuple) else (out,), inputs, grads)
            except Exception as exc:  # noqa: BLE001 - a failed torch.compile must not hide the other rows
                if name != "compiled":
                    raise
                print(f"  torch.compile failed, row skipped: {type(exc).__name__}: {exc}", flush=True)
                rows.append(dict(op=case["op"], shape=case["shape"], dtype=args.dtype, impl=name,
                                 error=f"{type(exc).__name__}: {exc}"))
                continue
            # Forward as in training (autograd recording): also spares torch.compile a no_grad recompile.
            fwd_ms = time_ms(lambda fn=fn: fn(*inputs))
            fb_ms = time_ms(_fwd_bwd(lambda fn=fn: fn(*inputs), inputs, grads))
            rows.append(dict(
                op=case["op"], shape=case["shape"], dtype=args.dtype, impl=name,
                fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                fwd_gbps=case["fwd_bytes"] / fwd_ms / 1e6, fwd_bwd_gbps=case["fb_bytes"] / fb_ms / 1e6,
                fwd_bytes=case["fwd_bytes"], fwd_bwd_bytes=case["fb_bytes"],
                max_abs_err_vs_eager=_max_err(out, expected),
            ))
        del case, inputs, grads, impls, expected
        if device == "cuda":
            torch.cuda.empty_cache()

    header = f"{'op':<11}{'shape':<24}{'impl':<10}{'fwd ms':>9}{'fwd GB/s':>10}{'f+b ms':>9}{'f+b GB/s':>10}{'err':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<11}{'x'.join(map(str, r['shape'])):<24}{r['impl']:<10}  failed: {r['error'][:60]}")
            continue
        print(
            f"{r['op']:<11}{'x'.join(map(str, r['shape'])):<24}{r['impl']:<10}{r['fwd_ms']:>9.3f}"
            f"{r['fwd_gbps']:>10.0f}{r['fwd_bwd_ms']:>9.3f}{r['fwd_bwd_gbps']:>10.0f}{r['max_abs_err_vs_eager']:>10.2e}"
        )
    report = common.envelope(
        device, smoke=args.smoke, compiled=not args.no_compile, seconds=round(time.perf_counter() - started, 1),
        bytes_note="minimal bytes: norms fwd 2*numel, fwd+bwd 5*numel; rope fwd 2*(q+k)+cos+sin, fwd+bwd twice that",
        results=rows,
    )
    common.write_json(args.out, report)
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
