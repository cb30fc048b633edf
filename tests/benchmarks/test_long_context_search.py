"""The long-context search's probe rule (benchmarks/memory/bench_long_context.py): where it jumps, and that it
always makes progress inside the bracket."""
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "memory" / "bench_long_context.py"


@pytest.fixture(scope="module")
def next_probe():
    spec = importlib.util.spec_from_file_location("bench_long_context", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_long_context", module)
    spec.loader.exec_module(module)
    return module.next_probe


def test_doubles_until_two_lengths_have_run(next_probe):
    assert next_probe([(8192, 20.0)], 8192, None, 80.0, 8.0, 2048) == 16384


def test_jumps_to_where_the_memory_line_meets_capacity(next_probe):
    # 10 GiB fixed + 1 GiB per 16K tokens: 0.97 * 80 = 77.6 GiB is reached at 16384 * 67.6 = 1,107,558.
    oks = [(16384, 11.0), (32768, 12.0)]
    assert next_probe(oks, 32768, None, 80.0, 8.0, 2048) == 32768 * 8  # capped at max_jump
    assert next_probe(oks, 32768, None, 80.0, 64.0, 2048) == 1107558 // 256 * 256


def test_after_a_failure_probes_inside_the_bracket(next_probe):
    oks = [(16384, 11.0), (32768, 12.0)]
    assert next_probe(oks, 32768, 65536, 80.0, 8.0, 2048) == 65536 - 2048  # the line says more fits
    flat = [(16384, 12.0), (32768, 12.0)]
    assert next_probe(flat, 32768, 65536, 80.0, 8.0, 2048) == 49152  # no line: the midpoint
    steep = [(16384, 40.0), (32768, 79.0)]
    assert next_probe(steep, 32768, 65536, 80.0, 8.0, 2048) == 32768 + 2048  # at least one step on
