"""Packing: over-long examples are truncated or refused as configured, never spilling into a neighbour;
the attention chooser picks an implementation that keeps packed examples apart."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from datasets import Dataset

from pronghorn.data.packing import (
    OverlongExampleError,
    enforce_max_length,
    pack_examples,
    packing_note,
    truncate_example,
)
from pronghorn.data.padding_free import PaddingFreeCollator
from pronghorn.nn.attention import VARLEN_SDPA, choose_attention_implementation, set_attention_implementation
from tests.factories import tiny_config, tiny_model

MAX = 16


def _dataset():
    # Distinct token ranges per example so any spill is visible; example 2 is over-long.
    lengths = [5, 9, 23, 3, 7, 12]
    ids = [[100 * (i + 1) + t for t in range(n)] for i, n in enumerate(lengths)]
    labels = [[-100] * 2 + row[2:] for row in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), ids


def test_truncate_example_policies():
    ex = {"input_ids": list(range(20)), "labels": list(range(20)), "attention_mask": [1] * 20}
    out = truncate_example(ex, MAX)
    assert all(len(out[k]) == MAX for k in ex) and out["input_ids"] == list(range(MAX))
    with pytest.raises(OverlongExampleError, match="example 4 has 20 tokens"):
        truncate_example(ex, MAX, "error", index=4)
    with pytest.raises(ValueError, match="overlong="):
        truncate_example(ex, MAX, "drop")


def test_enforce_max_length_truncates_with_warning_or_errors(caplog):
    ds, ids = _dataset()
    with caplog.at_level(logging.WARNING, logger="pronghorn.data.packing"):
        out = enforce_max_length(ds, MAX, "truncate")
    assert "1 of 6 examples" in caplog.text
    assert out[2]["input_ids"] == ids[2][:MAX] and out[2]["labels"] == ([-100] * 2 + ids[2][2:])[:MAX]
    assert [out[i]["input_ids"] for i in (0, 1, 3, 4, 5)] == [ids[i] for i in (0, 1, 3, 4, 5)]
    with pytest.raises(OverlongExampleError, match="example 2 has 23 tokens"):
        enforce_max_length(ds, MAX, "error")


@pytest.mark.parametrize("overlong", ["truncate", "error"])
def test_packing_never_corrupts_a_neighbour(overlong):
    ds, ids = _dataset()
    if overlong == "error":
        with pytest.raises(OverlongExampleError):
            pack_examples(ds, MAX, overlong="error")
        return
    packed = pack_examples(ds, MAX, overlong="truncate")
    assert len(packed) < len(ds), "packing should reduce the number of rows"
    recovered = []
    for row in packed:
        assert len(row["input_ids"]) <= MAX and sum(row["seq_lengths"]) == len(row["input_ids"])
        start = 0
        for n in row["seq_lengths"]:
            recovered.append(row["input_ids"][start : start + n])
            start += n
    expected = [row[:MAX] for row in ids]
    assert sorted(recovered) == sorted(expected)
    # Collated packed rows: positions restart per example and every example's first label is ignored.
    batch = PaddingFreeCollator(pad_token_id=0, max_length=MAX)([dict(r) for r in packed])
    pos, labels, flat = batch["position_ids"][0], batch["labels"][0], batch["input_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == len(ids)
    for s in starts:
        assert labels[s] == -100 and flat[s] % 100 == 0  # each example's own first token (100*k + 0)


def test_rejects_non_boundary_preserving_strategy():
    ds, _ = _dataset()
    with pytest.raises(ValueError, match="wrapped"):
        pack_examples(ds, MAX, strategy="wrapped")


def test_collator_overlong_policy(caplog):
    long = {"input_ids": list(range(3, 30))}
    with caplog.at_level(logging.WARNING, logger="pronghorn.data.padding_free"):
        b = PaddingFreeCollator(pad_token_id=0, max_length=MAX)([long, {"input_ids": [5, 6]}])
    assert b["input_ids"].shape == (1, MAX + 2) and "truncated 1 example" in caplog.text
    assert b["position_ids"][0, MAX:].tolist() == [0, 1]
    with pytest.raises(OverlongExampleError):
        PaddingFreeCollator(pad_token_id=0, max_length=MAX, overlong="error")([long])


def test_packing_note_counts_steps():
    note = packing_note(num_examples=1000, num_rows=200, batch_size=8, grad_accum=2)
    assert "1000 examples into 200 rows" in note and "13 steps instead of 63" in note


def test_attention_choice_on_cpu():
    llama = choose_attention_implementation(tiny_config("llama"), device="cpu")
    assert llama.implementation == VARLEN_SDPA and llama.reason
    assert choose_attention_implementation(tiny_config("llama"), device="cpu", padding_free=False).implementation == "sdpa"
    gemma2 = choose_attention_implementation(tiny_config("gemma2"), device="cpu")
    assert gemma2.implementation == "eager" and "softcapping" in gemma2.reason
    with pytest.raises(ValueError, match="softcapping"):
        choose_attention_implementation(tiny_config("gemma2"), device="cpu", requested="sdpa")
    assert choose_attention_implementation(tiny_config("llama"), requested="eager").implementation == "eager"


def test_set_attention_implementation_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen3"), LoraConfig(r=2, target_modules=["q_proj"]))
    choice = choose_attention_implementation(model, device="cpu")
    previous = set_attention_implementation(model, choice)
    assert previous == "sdpa" and model.get_base_model().config._attn_implementation == VARLEN_SDPA
    out = model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False).logits
    assert out.shape == (1, 4, 512)


def test_sdpa_backend_policy_takes_cudnn_only_where_its_plans_pay(monkeypatch):
    """cuDNN attention builds a plan per shape: it is chosen for long rows at once, for short ones only once
    their shape keeps coming back (fixed-length training), never for lengths seen a few times."""
    from pronghorn.nn import attention

    monkeypatch.setattr(attention, "_SHAPE_CALLS", {})
    long_row = torch.empty(1, 32, attention.CUDNN_MIN_LENGTH, 128, device="meta")
    assert attention._prefers_cudnn(long_row)
    short = torch.empty(2, 32, 2048, 128, device="meta")
    picks = [attention._prefers_cudnn(short) for _ in range(attention.CUDNN_AFTER_CALLS + 1)]
    assert not any(picks[:-1]) and picks[-1]
    other = torch.empty(2, 32, 2047, 128, device="meta")
    assert not attention._prefers_cudnn(other)
    with attention.graph_capture_calls():  # a CUDA graph's warm-up and capture: replays repeat the shape
        assert attention._prefers_cudnn(torch.empty(2, 32, 2046, 128, device="meta"))
    assert not attention._prefers_cudnn(torch.empty(2, 32, 2045, 128, device="meta"))
    # Off CUDA the policy leaves sdpa's own choice alone.
    assert isinstance(attention.sdpa_backend_policy(torch.empty(1, 1, 4, 8)), contextlib.nullcontext)


@pytest.mark.gpu
def test_a_call_captured_into_a_cuda_graph_takes_cudnn_at_its_first_call(monkeypatch):
    """Every replay runs what the capture picked, so a captured shape is one that keeps coming back."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from pronghorn.nn import attention

    monkeypatch.setattr(attention, "_SHAPE_CALLS", {})
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def run():
        with attention.sdpa_backend_policy(q):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    expected = run()  # an eager first call of this shape: not cuDNN yet
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with attention.graph_capture_calls():
        with torch.cuda.stream(stream):
            run()  # warm-up on the capture stream (cuDNN builds its plan here, it cannot while capturing)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            out = run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("cudnn" in name for name in kernels), kernels
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
