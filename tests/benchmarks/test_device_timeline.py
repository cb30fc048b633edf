"""The profile's device-timeline summary: busy time is the union over streams, gaps are where nothing ran."""
from __future__ import annotations

import pytest

from benchmarks.common import device_timeline, per_step_timelines

MS = 1_000_000


def test_union_over_streams_and_gaps_between_activity():
    kernels = [
        (0, 4 * MS, "gemm", 7),
        (1 * MS, 3 * MS, "copy", 20),       # overlaps the GEMM: not idle, not counted twice
        (6 * MS, 7 * MS, "norm", 7),        # 2 ms gap after the GEMM
        (7 * MS + 50_000, 8 * MS, "rope", 7),  # 0.05 ms gap: below the 0.1 ms idle threshold
    ]
    t = device_timeline(kernels)
    assert t["window_ms"] == pytest.approx(8.0)
    assert t["busy_ms"] == pytest.approx(4.0 + 1.0 + 0.95)
    assert t["busy_fraction"] == pytest.approx(5.95 / 8.0)
    assert t["main_stream_busy_ms"] == pytest.approx(5.95)
    assert t["idle_ms_in_gaps_over_100us"] == pytest.approx(2.0)
    assert t["gaps"][0] == {"ms": pytest.approx(2.0), "after": "gemm", "before": "norm"}
    assert t["gaps"][1]["ms"] == pytest.approx(0.05)


def test_a_kernel_inside_a_longer_one_does_not_end_the_busy_interval():
    t = device_timeline([(0, 10 * MS, "long", 1), (2 * MS, 3 * MS, "short", 2), (11 * MS, 12 * MS, "next", 1)])
    assert t["busy_ms"] == pytest.approx(11.0)
    assert t["gaps"] == [{"ms": pytest.approx(1.0), "after": "long", "before": "next"}]


def test_empty_window():
    assert device_timeline([])["busy_fraction"] == 0.0


def test_main_stream_gaps_say_how_much_a_side_stream_filled():
    kernels = [
        (0, 4 * MS, "gemm", 7),
        (3 * MS, 6 * MS, "copy", 20),  # runs on while the main stream waits from 4 to 6 ms
        (6 * MS, 7 * MS, "norm", 7),
        (9 * MS, 10 * MS, "rope", 7),  # 2 ms with nothing running at all
    ]
    t = device_timeline(kernels)
    assert t["main_stream_busy_ms"] == pytest.approx(6.0)
    assert t["main_stream_idle_ms"] == pytest.approx(4.0)
    assert t["main_stream_idle_while_side_streams_ran_ms"] == pytest.approx(2.0)
    assert [g["ms"] for g in t["main_stream_gaps"]] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert t["main_stream_gaps"][0]["after"] in ("gemm", "norm")
    assert {(n["after"], n["before"], n["count"]) for n in t["main_stream_idle_by_neighbours"]} == {
        ("gemm", "norm", 1), ("norm", "rope", 1)}


def test_per_step_timelines_split_at_the_optimizer_kernels():
    adam = "multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>"
    kernels = [(0, 4 * MS, "gemm", 1), (4 * MS, 5 * MS, adam, 1), (5 * MS, 6 * MS, adam, 1),  # step 1: no gap
               (6 * MS, 8 * MS, "gemm", 1), (11 * MS, 12 * MS, "gemm", 1), (12 * MS, 13 * MS, adam, 1)]  # 3 ms gap
    steps = per_step_timelines(kernels)
    assert len(steps) == 2
    assert steps[0]["window_ms"] == pytest.approx(6.0) and steps[0]["main_stream_idle_ms"] == pytest.approx(0.0)
    assert steps[1]["window_ms"] == pytest.approx(7.0) and steps[1]["main_stream_idle_ms"] == pytest.approx(3.0)
    assert steps[1]["main_stream_gaps"][0]["ms"] == pytest.approx(3.0)


def test_kernels_by_launching_op_sums_per_op_shapes_and_kernel():
    from types import SimpleNamespace as NS

    from benchmarks.common import kernels_by_launching_op

    copy = NS(name="direct_copy_kernel_cuda", duration=52.0)  # microseconds, as torch.profiler reports them
    gemm = NS(name="nvjet_gemm", duration=640.0)
    events = [NS(name="aten::copy_", input_shapes=[[2, 2048, 32, 128]], kernels=[copy]),
              NS(name="aten::copy_", input_shapes=[[2, 2048, 32, 128]], kernels=[copy]),
              NS(name="aten::mm", input_shapes=[[4096, 4096], [4096, 14336]], kernels=[gemm]),
              NS(name="LoraMLPFunction", input_shapes=[], kernels=[])]
    lines = kernels_by_launching_op(events).splitlines()
    assert "aten::mm" in lines[0] and "0.640 ms" in lines[0] and lines[1].strip() == "nvjet_gemm"
    assert "aten::copy_" in lines[2] and "0.104 ms" in lines[2] and "2x" in lines[2]
    assert len(lines) == 4  # an op that launched nothing is not listed
