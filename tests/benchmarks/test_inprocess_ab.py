"""The in-process A/B's settings and phase split, and the launch-cost probe's process facts (CPU parts only)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import inprocess_ab  # noqa: E402
import launch_cost_probe  # noqa: E402


def test_each_setting_starts_from_the_defaults():
    from pronghorn.memory import offload, stash

    try:
        inprocess_ab.apply_setting("lead8")
        assert offload._COPYING.limit == 8
        inprocess_ab.apply_setting("residual")
        assert offload._COPYING.limit == 2 and stash._config["residual"]
        inprocess_ab.apply_setting("stash4")
        assert stash._config["layers"] == 4 and not stash._config["residual"]
        inprocess_ab.apply_setting("stash2-30+late12+flight3")
        assert (stash._config["first"], stash._config["layers"], stash._config["late_layers"]) == (2, 28, 12)
        assert stash.IN_FLIGHT == 3
        with pytest.raises(ValueError, match="unknown setting 'fast'"):
            inprocess_ab.apply_setting("fast")
    finally:
        inprocess_ab.apply_setting("default")
    assert offload._COPYING.limit == 2 and stash._config["layers"] == 0 and not stash._config["residual"]
    assert stash._config["first"] == 0 and stash._config["late_layers"] == 0 and stash.IN_FLIGHT == 2


def test_phase_times_pair_host_and_device_marks():
    class Event:
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, other):
            return other.ms - self.ms

    marks = [(0.0, Event(5.0)), (0.1, Event(125.0)), (0.3, Event(330.0)), (0.305, Event(331.0))]
    got = inprocess_ab._phase_times(marks)
    assert got["forward"] == {"host": pytest.approx(100.0), "gpu": 120.0}
    assert got["backward"] == {"host": pytest.approx(200.0), "gpu": 205.0}
    assert got["optimizer"] == {"host": pytest.approx(5.0), "gpu": 1.0}


def test_process_facts_see_this_process():
    facts = launch_cost_probe.process_facts()
    assert facts["python_threads"] >= 1 and facts["os_threads"] >= facts["python_threads"]
    assert facts["affinity"] >= 1 and facts["torch_threads"] >= 1
    assert isinstance(facts["busy_os_threads"], list)


def test_the_shared_training_step_marks_each_phase_and_trains():
    import torch
    import train_throughput

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, labels):
            return type("Out", (), {"loss": (self.w * input_ids.float()).mean()})()

    model, calls = Tiny(), []
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    step = train_throughput.make_step(model, opt, "cpu", autocast=False, mark=lambda: calls.append(model.w.item()))
    loss = step(torch.tensor([[1, 3]]))
    assert loss.item() == 2.0 and not loss.requires_grad
    assert calls == [1.0, 1.0, 1.0, -1.0]  # before, after forward, after backward, after the optimizer (w -= 2)
    assert model.w.grad is None  # zero_grad(set_to_none=True)
