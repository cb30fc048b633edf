"""Tiny LoRA models for export tests: random non-zero lora_B so merging actually changes weights."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from tests.factories import byte_bpe_tokenizer, tiny_model

TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(family: str, seed: int = 0, dtype=torch.float32, r: int = 4, **overrides):
    """A tiny ``family`` model wrapped in LoRA with every lora_B random (so the delta is non-zero)."""
    model = tiny_model(family, seed=seed, dtype=dtype, **overrides)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS.get(family, DEFAULT_TARGETS), lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model.eval()


def tokenizer_for(model):
    """The offline byte-level BPE tokenizer sized to ``model``'s vocabulary."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return byte_bpe_tokenizer(vocab_size=config.vocab_size)


def input_ids(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 512):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(30, vocab, (batch, length), generator=gen)
