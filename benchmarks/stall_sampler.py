"""Where the host was when a training step ran long: a sampler of the main thread's Python stack.

A step that takes 100+ ms longer than its neighbours, with no garbage collection and no allocator event, is
either the GPU running slower or the host not issuing work. A daemon thread records the main thread's
innermost frames every ``interval`` seconds; the timed loop marks where each step's issue starts and ends.
For a slow step, the frames the sampler saw most often in its host window say what the host was doing,
and a hole in the samples (the sampler itself could not run for a while) says the main thread held the
interpreter inside one C call, with the frames on either side of the hole naming that call.

The sampler costs the step something: each sample takes the interpreter lock from whichever thread holds it
(in backward, autograd's device thread running the Python backward functions). A step whose host is the
bottleneck runs slower with it on, so take throughput figures from runs without it.

    sampler = StallSampler(); sampler.start()
    for batch in batches:
        sampler.begin_step(); step(batch); sampler.end_step()
    sampler.stop(); report = sampler.report(gpu_step_seconds)
"""
from __future__ import annotations

import collections
import gc
import itertools
import statistics
import sys
import threading
import time

__all__ = ["StallSampler"]


def _frames(frame, depth: int) -> tuple[str, ...]:
    out = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append(f"{code.co_filename.rsplit('site-packages/', 1)[-1].rsplit('.bench_tree/', 1)[-1]}:"
                   f"{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return tuple(out)


class StallSampler:
    """Samples the calling thread's stack from a daemon thread; see the module docstring."""

    def __init__(self, interval: float = 0.005, depth: int = 5, hole: float = 0.015):
        self.interval, self.depth, self.hole = interval, depth, hole
        self.target = threading.get_ident()
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.windows: list[tuple[float, float]] = []
        self._start = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-sampler", daemon=True)
        self.collections: list[tuple[float, float, int]] = []  # (start, end, generation) of every GC pass
        self._gc_start = None

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = sys._current_frames().get(self.target)
            if frame is not None:
                self.samples.append((time.perf_counter(), _frames(frame, self.depth)))
            del frame
            time.sleep(self.interval)

    def _on_gc(self, phase, info) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.collections.append((self._gc_start, time.perf_counter(), info.get("generation", -1)))

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        gc.callbacks.remove(self._on_gc)

    def begin_step(self) -> None:
        self._start = time.perf_counter()

    def end_step(self) -> None:
        self.windows.append((self._start, time.perf_counter()))

    def _step_view(self, lo: float, hi: float, top: int) -> dict:
        inside = [(t, s) for t, s in self.samples if lo <= t <= hi]
        leaves = collections.Counter(s[:2] for _, s in inside)
        holes = []
        for (t0, s0), (t1, s1) in itertools.pairwise(inside):
            if t1 - t0 > self.hole:
                holes.append({"ms": round((t1 - t0) * 1e3, 1), "at_ms": round((t0 - lo) * 1e3, 1),
                              "before": list(s0), "after": list(s1)})
        passes = [(g, (b - a) * 1e3) for a, b, g in self.collections if lo <= a <= hi]
        collected = {"passes": len(passes), "ms": round(sum(ms for _, ms in passes), 2),
                     "over_1ms": [{"generation": g, "ms": round(ms, 1)} for g, ms in passes if ms >= 1.0]}
        return {"samples": len(inside), "gc": collected,
                "top_frames": [{"share": round(n / max(1, len(inside)), 3), "frames": list(f)}
                               for f, n in leaves.most_common(top)],
                "holes": sorted(holes, key=lambda h: -h["ms"])[:top]}

    def report(self, gpu_step_seconds: list[float] | None = None, slow: float = 1.1, top: int = 6) -> dict:
        """Per step: host issue ms (and GPU ms if given); for each step slower than ``slow`` x the median on
        either clock, and for the median step, what the sampler saw in its host window."""
        host = [(b - a) * 1e3 for a, b in self.windows]
        gpu = [s * 1e3 for s in gpu_step_seconds] if gpu_step_seconds else [None] * len(host)
        med_host = statistics.median(host) if host else 0.0
        med_gpu = statistics.median([g for g in gpu if g is not None]) if any(g is not None for g in gpu) else None
        steps = []
        typical = min(range(len(host)), key=lambda i: abs(host[i] - med_host)) if host else None
        for i, ((lo, hi), h, g) in enumerate(zip(self.windows, host, gpu)):
            entry = {"step": i, "host_ms": round(h, 1), "gpu_ms": None if g is None else round(g, 1)}
            is_slow = h > slow * med_host or (g is not None and med_gpu and g > slow * med_gpu)
            if is_slow or i == typical:
                entry["kind"] = "slow" if is_slow else "typical"
                # a slow GPU step may come from a host stall in the step before (the host runs ahead)
                entry["host_window"] = self._step_view(self.windows[i - 1][0] if i else lo, hi, top)
            steps.append(entry)
        return {"interval_ms": self.interval * 1e3, "hole_ms": self.hole * 1e3, "median_host_ms": round(med_host, 1),
                "median_gpu_ms": None if med_gpu is None else round(med_gpu, 1), "steps": steps}
