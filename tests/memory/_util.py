"""Helpers shared by the memory tests: gradients of a tiny model under a given setup."""
from __future__ import annotations

import torch


def trainable_grads(model) -> dict[str, torch.Tensor]:
    """Detached copies of every trainable parameter's gradient, keyed by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_close(actual: dict, expected: dict, atol=1e-5, rtol=1e-5):
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    assert expected, "no gradients to compare"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)


def offloaded_lora_model(tmp_path, family: str, layers: int, quantized: bool = False):
    """A tiny bf16 (or 4-bit) ``family`` checkpoint of ``layers`` layers, saved under ``tmp_path`` and loaded on the
    GPU with LoRA on every linear layer and offloaded checkpointing, in training mode: what the CUDA-graph tests
    train."""
    from pronghorn import FastLanguageModel
    from tests.factories import save_tiny

    path = save_tiny(family, tmp_path / family, num_hidden_layers=layers)
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=128, load_in_4bit=quantized,
                                                 dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False, use_gradient_checkpointing="unsloth",
                                             random_state=0)
    return model.cuda().train()


def cuda_ids(length: int, seed: int, rows: int = 2) -> torch.Tensor:
    return torch.randint(5, 500, (rows, length), generator=torch.Generator().manual_seed(seed)).cuda()
