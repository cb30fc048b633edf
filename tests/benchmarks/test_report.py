"""The results report: ratios come only from baselines of the same shape, mode and batch."""
from __future__ import annotations

import pytest

from benchmarks.report import add_ratios, markdown


def _rec(config, mode, tokens_per_s, peak_gib):
    return dict(kind="train_throughput", config=config, label=config, mode=mode, shape="llama-3.1-8b",
                batch_size=2, seq_len=2048, status="ok", tokens_per_s=tokens_per_s, peak_gib=peak_gib,
                ms_per_step=4096 / tokens_per_s * 1000, step_s=[4096 / tokens_per_s], mfu=0.5, mfu_lora=0.4,
                losses=[11.0])


def test_ratios_against_each_baseline_of_the_same_mode():
    records = [_rec("hf_peft", "qlora", 7000, 13.0), _rec("hf_peft_kbit", "qlora", 5000, 18.0),
               _rec("unsloth", "qlora", 10000, 7.7), _rec("pronghorn", "qlora", 11000, 7.5),
               _rec("hf_peft", "bf16", 6000, 23.0)]
    add_ratios(records)
    ours = records[3]
    assert ours["speed_vs_hf_peft"] == pytest.approx(11000 / 7000)
    assert ours["speed_vs_hf_peft_kbit"] == pytest.approx(11000 / 5000)
    assert ours["memory_vs_hf_peft_kbit"] == pytest.approx(7.5 / 18.0)
    assert ours["speed_vs_unsloth"] == pytest.approx(1.1)
    assert "speed_vs_unsloth" not in records[4]  # no bf16 Unsloth row: no ratio borrowed from QLoRA
    text = markdown(records, None)
    assert "Against hf_peft_kbit" in text and "pronghorn 2.20× speed, 0.42× memory" in text


def test_clock_and_power_are_reported_per_row_where_sampled():
    records = [_rec("unsloth", "bf16", 10000, 17.3), _rec("pronghorn", "bf16", 11500, 17.1)]
    records[1]["allocator_events_per_step"] = [{"sm_clock_mhz": 1600, "power_w": 690.0},
                                               {"sm_clock_mhz": 1900, "power_w": 650.0},
                                               {"sm_clock_mhz": 1620, "power_w": 695.0}]
    text = markdown(records, None)
    assert "pronghorn bf16 1,620 MHz at 690 W" in text
    assert "unsloth bf16" not in text.split("SM clock")[1].split("\n")[0]  # no samples, no entry
