"""Tiled MLP gives the untiled loss and gradients, with LoRA (dropout replayed) and full fine-tuning."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pronghorn.memory import enable_gradient_checkpointing
from pronghorn.memory.tiled_mlp import enable_tiled_mlp, tiled_mlp_forward
from tests.factories import tiny_model
from tests.memory._util import assert_grads_close, trainable_grads


def _model(setup, family="llama"):
    model = tiny_model(family, num_hidden_layers=2)
    if setup == "lora":
        # No dropout: tiles draw their masks per tile, so only dropout-free runs can equal the untiled ones
        # (test_dropout_masks_replayed checks that tiles replay their own masks).
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
    return model.train()


def _step(model):
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 23))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), trainable_grads(model)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("setup", ["lora", "full"])
def test_tiled_matches_untiled(setup, family):
    model = _model(setup, family)
    ref_loss, ref = _step(model)
    calls = []
    patch = enable_tiled_mlp(model, tile_tokens=5)  # 46 tokens -> 10 tiles, last one short
    assert len(patch.modules) == 2
    for mlp_name in patch.modules:
        mlp = model.get_submodule(mlp_name if setup == "full" else "base_model.model." + mlp_name)
        mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].numel() // i[0].shape[-1]))
    loss, grads = _step(model)
    assert calls and max(calls) == 5, "the MLP should see 5-token tiles"
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, ref)
    patch.revert()
    calls.clear()
    _step(model)
    assert max(calls) == 46, "after revert the MLP sees the whole batch"


def test_tiled_with_offloaded_checkpointing():
    model = _model("lora")
    _, ref = _step(model)
    enable_gradient_checkpointing(model, "offload")
    enable_tiled_mlp(model, tile_tokens=7)
    assert_grads_close(_step(model)[1], ref)


def test_input_gradient_and_no_grad_path():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    x = torch.randn(3, 10, 8, requires_grad=True)
    y = tiled_mlp_forward(mlp, x, tile_tokens=4)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    mlp2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    mlp2.load_state_dict(mlp.state_dict())
    mlp2(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(mlp[0].weight.grad, mlp2[0].weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(tiled_mlp_forward(mlp, x, 4), mlp(x))


def test_dropout_masks_replayed():
    # Backward must recompute each tile with the dropout mask its forward used: compare with the
    # same tiles run by plain autograd from the same seed.
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 8)).train()
    x = torch.randn(2, 9, 8)
    torch.manual_seed(3)
    tiled_mlp_forward(mlp, x, tile_tokens=4).square().sum().backward()
    tiled = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    torch.manual_seed(3)
    torch.cat([mlp(t) for t in x.reshape(-1, 8).split(4)]).square().sum().backward()
    for a, b in zip(tiled, [p.grad for p in mlp.parameters()]):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_cuda_tiled_mlp_peak_memory_lower():
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=512, intermediate_size=8192,
                       num_attention_heads=8, num_key_value_heads=8).cuda().train()
    ids = torch.randint(3, 500, (1, 16384), device="cuda")

    def peak():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(input_ids=ids, use_cache=False).logits.float().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), trainable_grads(model)

    untiled, ref = peak()
    enable_tiled_mlp(model, tile_tokens=2048)
    tiled, grads = peak()
    assert tiled < untiled - 3 * 16384 * 8192 * 4 // 2  # at least half of gate/up/act saved activations gone
    assert_grads_close(grads, ref, atol=1e-4, rtol=1e-4)  # GPU matmul tiling changes summation order
