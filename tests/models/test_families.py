"""Every family loads, trains with LoRA, saves, reloads and merges; unknown families use the generic path."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pronghorn import FastLanguageModel
from tests.factories import FAST_FAMILIES, GENERIC_FAMILIES, save_tiny

TARGETS = {"lfm2": ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"],
           "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _batch(vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train(model, batch, steps, lr=5e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", FAST_FAMILIES + GENERIC_FAMILIES)
def test_lora_train_save_reload_merge(family, tmp_path):
    base_dir = save_tiny(family, tmp_path / "base")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base_dir), max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16,
                                             target_modules=TARGETS.get(family, "all-linear"),
                                             use_gradient_checkpointing="unsloth")
    batch = _batch()
    losses = _train(model, batch, steps=20)
    assert losses[-1] < losses[0] - 0.5, f"{family}: loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"

    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), max_seq_length=64)
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)

    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    # merged in fp32 and written in the model's dtype (fp32 here): only summation-order differences remain
    torch.testing.assert_close(_logits(plain, batch), expected, atol=2e-4, rtol=2e-4)


def test_continue_training_from_adapter(tmp_path):
    base_dir = save_tiny("llama", tmp_path / "base")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base_dir))
    model = FastLanguageModel.get_peft_model(model, r=8)
    batch = _batch()
    first = _train(model, batch, steps=10)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    resumed, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"))
    trainable = [n for n, p in resumed.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    second = _train(resumed, batch, steps=10)
    assert abs(second[0] - first[-1]) < 0.3, "the reloaded adapter did not continue from where training stopped"
    assert second[-1] < second[0]


def test_full_finetuning(tmp_path):
    base_dir = save_tiny("qwen3", tmp_path / "base")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base_dir), full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    batch = _batch()
    losses = _train(model, batch, steps=15, lr=2e-3)
    assert losses[-1] < losses[0] - 0.5
    expected = _logits(model, batch)
    model.save_pretrained_merged(tmp_path / "full", tokenizer, save_method="merged_16bit")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    torch.testing.assert_close(_logits(plain, batch), expected, atol=1e-5, rtol=1e-5)


def test_rope_scaling_applied_beyond_trained_context(tmp_path):
    base_dir = save_tiny("llama", tmp_path / "base")  # trained context: 256
    model, _ = FastLanguageModel.from_pretrained(str(base_dir), max_seq_length=1000)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0


def test_dtype_default_is_fp32_on_cpu(tmp_path):
    base_dir = save_tiny("llama", tmp_path / "base")
    model, _ = FastLanguageModel.from_pretrained(str(base_dir))
    if not torch.cuda.is_available():
        assert next(model.parameters()).dtype == torch.float32
