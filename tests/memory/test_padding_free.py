"""Padded, padding-free and packed batches give the same per-example losses and LoRA gradients.

Covered: llama, qwen3, mistral (sliding window) and gemma2 (sliding window + logit softcapping),
with each attention implementation the family can use on CPU, against a padded eager reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from pronghorn.data.padding_free import PaddingFreeCollator
from pronghorn.data.packing import padding_free_safety_issues
from pronghorn.nn.attention import VARLEN_SDPA, set_attention_implementation
from tests.factories import tiny_model
from tests.memory._util import assert_grads_close, trainable_grads

# Two packed rows of 24 tokens: [13, 7, 4] and [20, 4]; sliding window 8 is shorter than most.
LENGTHS = [13, 20, 7, 4, 4]
ROWS = [[0, 2, 3], [1, 4]]
WINDOW = 8
CASES = [
    ("llama", {}, ["sdpa", "eager", VARLEN_SDPA]),
    ("qwen3", {}, ["sdpa", "eager", VARLEN_SDPA]),
    ("mistral", {"sliding_window": WINDOW}, ["sdpa", "eager", VARLEN_SDPA]),
    ("gemma2", {"sliding_window": WINDOW}, ["eager"]),
]


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g) for n in LENGTHS]


def _lora(family, overrides, impl):
    model = tiny_model(family, **overrides)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False))
    set_attention_implementation(model, impl)
    return model.train()


def _per_example_losses(spans):
    """Summed next-token CE of each example, from [row, start, length] spans."""
    out = []
    for logits, ids, start, n in spans:
        out.append(F.cross_entropy(logits[start : start + n - 1].float(), ids[start + 1 : start + n], reduction="sum"))
    return torch.stack(out)


def _run(model, layout, examples):
    model.zero_grad(set_to_none=True)
    if layout == "padded":
        L = max(LENGTHS)
        ids = torch.zeros(len(examples), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        spans = [(logits[i], ids[i], 0, len(e)) for i, e in enumerate(examples)]
    elif layout == "padding_free":
        batch = PaddingFreeCollator(pad_token_id=0)([{"input_ids": e.tolist()} for e in examples])
        assert batch["input_ids"].shape == (1, sum(LENGTHS))
        assert padding_free_safety_issues(model, batch) == []
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        starts = torch.tensor([0] + LENGTHS).cumsum(0)
        spans = [(logits, batch["input_ids"][0], int(starts[i]), n) for i, n in enumerate(LENGTHS)]
    else:  # packed: two rows of 24, position_ids restarting per example, no attention_mask
        ids = torch.stack([torch.cat([examples[i] for i in row]) for row in ROWS])
        pos = torch.stack([torch.cat([torch.arange(LENGTHS[i]) for i in row]) for row in ROWS])
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        by_example = {}
        for r, row in enumerate(ROWS):
            start = 0
            for i in row:
                by_example[i] = (logits[r], ids[r], start, LENGTHS[i])
                start += LENGTHS[i]
        spans = [by_example[i] for i in range(len(examples))]
    losses = _per_example_losses(spans)
    (losses.sum() / (sum(LENGTHS) - len(LENGTHS))).backward()
    return losses.detach(), trainable_grads(model)


@pytest.mark.parametrize("family,overrides,impls", CASES, ids=[c[0] for c in CASES])
def test_layouts_agree(family, overrides, impls):
    examples = _examples()
    ref_losses, ref_grads = _run(_lora(family, overrides, "eager"), "padded", examples)
    for impl in impls:
        model = _lora(family, overrides, impl)
        for layout in ("padded", "padding_free", "packed"):
            losses, grads = _run(model, layout, examples)
            torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5, msg=f"{impl}/{layout} losses")
            assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("family,overrides,impls", CASES, ids=[c[0] for c in CASES])
def test_no_cross_example_attention(family, overrides, impls):
    examples = _examples()
    starts = torch.tensor([0] + LENGTHS).cumsum(0).tolist()
    for impl in impls:
        model = _lora(family, overrides, impl).eval()
        collate = PaddingFreeCollator(pad_token_id=0)
        with torch.no_grad():
            base = collate([{"input_ids": e.tolist()} for e in examples])
            ref = model(input_ids=base["input_ids"], position_ids=base["position_ids"], use_cache=False).logits[0]
            changed = list(examples)
            changed[1] = torch.randint(3, 500, (LENGTHS[1],), generator=torch.Generator().manual_seed(9))
            pert = collate([{"input_ids": e.tolist()} for e in changed])
            out = model(input_ids=pert["input_ids"], position_ids=pert["position_ids"], use_cache=False).logits[0]
        for i in range(len(LENGTHS)):
            sl = slice(starts[i], starts[i + 1])
            if i == 1:
                assert not torch.allclose(out[sl], ref[sl]), "perturbing an example must change its own logits"
            else:
                torch.testing.assert_close(out[sl], ref[sl], atol=1e-6, rtol=1e-6, msg=f"{impl}: example {i} changed")


def test_cache_contaminates_and_safety_check_says_so():
    # Documented hazard: a training forward that builds a cache disables transformers' boundary detection.
    model = tiny_model("llama")
    model.config.use_cache = True
    batch = PaddingFreeCollator(pad_token_id=0, set_use_cache_false=False)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    issues = padding_free_safety_issues(model, batch)
    assert any("use_cache" in s for s in issues)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[8, 9]]), use_cache=False).logits[0]
        flat_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 3:]
        flat_safe = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0, 3:]
    assert not torch.allclose(flat_cache, alone, atol=1e-4)
    torch.testing.assert_close(flat_safe, alone, atol=1e-6, rtol=1e-6)


def test_collator_labels_and_positions():
    c = PaddingFreeCollator(pad_token_id=0)
    b = c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in b and b["use_cache"] is False
    padded = PaddingFreeCollator(pad_token_id=0, pad_to_multiple_of=8)([{"input_ids": [5, 6, 7]}])
    assert padded["input_ids"].shape == (1, 8) and (padded["labels"][0, 3:] == -100).all()
    assert padding_free_safety_issues(tiny_model("llama"), {**b, "attention_mask": torch.ones(1, 5)})
    assert padding_free_safety_issues(tiny_model("llama"), {**b, "labels": torch.tensor([[5, 6, 7, 8, 9]])})
