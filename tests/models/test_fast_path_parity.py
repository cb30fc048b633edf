"""Patched (pronghorn fast paths) vs unpatched Hugging Face model: same loss, same LoRA gradients, same curve."""
import pytest
import torch

from pronghorn import FastLanguageModel, unpatch_model
from tests.factories import FAST_FAMILIES, save_tiny
from tests.models.test_families import _batch, _train


def _lora_model(path, fast):
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=64, fast_paths=fast)
    # init_lora_weights=False: B is random too, so gradients reach A and the fused paths are exercised
    return FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False, use_gradient_checkpointing=False)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", params=FAST_FAMILIES)
def pair(request, tmp_path_factory):
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, _lora_model(path, fast=False), _lora_model(path, fast=True)


def test_every_layer_is_patched(pair):
    family, _, fast = pair
    summary = fast.get_base_model()._pronghorn_patch.summary()
    assert summary.get("attention") == 2 and summary.get("mlp") == 2, summary
    assert summary.get("norm", 0) >= 5 and summary.get("lm_head_loss") == 1, summary


@pytest.mark.interpreted
def test_first_step_loss_and_lora_grads_match(pair):
    family, ref, fast = pair
    batch = _batch()
    ref.train(), fast.train()
    loss_ref = ref(**batch).loss
    loss_fast = fast(**batch).loss
    loss_ref.backward(), loss_fast.backward()
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-5, rtol=1e-5)
    g_ref, g_fast = _grads(ref), _grads(fast)
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=f"{family}: {name}")
    ref.zero_grad(), fast.zero_grad()


def test_thirty_step_curves_agree(pair):
    family, ref, fast = pair
    batch = _batch(seed=1)
    curves = []
    for model in (ref, fast):
        curves.append(torch.tensor(_train(model, batch, steps=30, lr=1e-3), dtype=torch.float64))
    rel = ((curves[1] - curves[0]).abs() / curves[0].abs()).max().item()
    assert rel < 1e-4, f"{family}: loss curves differ by {rel:.2e} relative"


def test_unpatch_restores_original_forwards(pair):
    family, _, fast = pair
    base = fast.get_base_model()
    batch = _batch()
    fast.eval()
    with torch.no_grad():
        patched_logits = fast(**batch).logits
    patched = [m for m, _ in base._pronghorn_patch.patched]
    unpatch_model(base)
    assert all("forward" not in m.__dict__ for m in patched)
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch).logits, patched_logits, atol=1e-5, rtol=1e-5)
