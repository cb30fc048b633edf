"""Tiny LoRA models for export tests: random non-zero lora_B so merging actually changes weights."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from tests.factories import byte_bpe_tokenizer, tiny_model

TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora_b(peft_model, seed: int, scale: float):
    """Fill every lora_B with ``scale`` x N(0, 1) drawn from ``seed`` and return the model in eval mode.

    PEFT starts lora_B at zero, so without this a merge would change no weight and prove nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return peft_model.eval()


def _wrap_in_lora(model, family: str, r: int, seed: int, scale: float):
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS.get(family, DEFAULT_TARGETS), lora_dropout=0.0)
    return randomize_lora_b(get_peft_model(model, cfg), seed + 1, scale)


def lora_model(family: str, seed: int = 0, dtype=torch.float32, r: int = 4, **overrides):
    """A tiny ``family`` model wrapped in LoRA with every lora_B random (so the delta is non-zero)."""
    return _wrap_in_lora(tiny_model(family, seed=seed, dtype=dtype, **overrides), family, r, seed, 0.05)


def tokenizer_for(model):
    """The offline byte-level BPE tokenizer sized to ``model``'s vocabulary."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return byte_bpe_tokenizer(vocab_size=config.vocab_size)


def input_ids(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 512):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(30, vocab, (batch, length), generator=gen)


def trained_lora_model(family: str, tokenizer, steps: int = 30, seed: int = 0, **overrides):
    """A tiny model fitted to the factory corpus, then wrapped in LoRA with random non-zero lora_B.

    Fitting makes next-token distributions peaked like a trained model's; a random model has near-tied
    logits, which turns top-1 and greedy-generation comparisons into coin flips.
    """
    from tests.factories import CORPUS

    model = tiny_model(family, seed=seed, **overrides).train()
    batch = tokenizer(CORPUS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _wrap_in_lora(model.eval(), family, 4, seed, 0.02)
