"""Merged exports reload with plain transformers and reproduce the in-memory LoRA model."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from pronghorn.export.merge import plan_merge
from pronghorn.export.save import save_pretrained_merged
from tests.export.helpers import input_ids, lora_model, randomize_lora_b, tokenizer_for
from tests.factories import save_tiny
from tests.tolerances import assert_close


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_merged_16bit_reloads_with_same_logits(tmp_path, family):
    model = lora_model(family)
    ids = input_ids()
    expected = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer_for(model))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    # fp32 model: the merge W + s*B@A is done in fp32, so only summation-order rounding differs.
    assert_close(_logits(reloaded, ids), expected, dtype=torch.float32, scale=10)
    # the user's PEFT model is untouched: still LoRA, weights unchanged, not merged
    assert isinstance(model, PeftModel)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(getattr(m, "merged", False) for m in model.modules())
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "README.md", "generation_config.json"} <= files
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_merged_16bit_in_bf16_and_sharded(tmp_path):
    model = lora_model("llama", dtype=torch.bfloat16)
    ids = input_ids()
    expected = _logits(model, ids)
    out = save_pretrained_merged(model, tmp_path / "m", tokenizer_for(model), max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    # merged then rounded to bf16 once vs. LoRA added at bf16 at run time: bf16 tolerance, x2 for two roundings
    assert_close(_logits(reloaded, ids), expected, dtype=torch.bfloat16, scale=2)


def test_tied_embeddings_written_once(tmp_path):
    model = lora_model("gemma")
    plan = plan_merge(model)
    names = [s.name for s in plan.sources]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert not any("lora_" in n or "base_layer" in n for n in names)


def test_lora_method_writes_adapter_only(tmp_path):
    model = lora_model("qwen2")
    out = save_pretrained_merged(model, tmp_path / "adapter", tokenizer_for(model), save_method="lora")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    assert not any(f.startswith("model") for f in files)
    base = lora_model("qwen2").get_base_model()  # same seed, same base weights
    reloaded = PeftModel.from_pretrained(base, out).eval()
    ids = input_ids()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_bad_save_method_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="save_method"):
        save_pretrained_merged(lora_model("llama"), tmp_path / "x", save_method="merged_8bit")


def _four_bit_lora(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, device_map="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    return randomize_lora_b(model, seed=3, scale=0.05)


def test_merge_from_4bit_base(tmp_path):
    # bitsandbytes 4-bit runs on CPU here (bnb >= 0.45), so this is a CPU test.
    model = _four_bit_lora(tmp_path)
    ids = input_ids()
    expected = _logits(model, ids)
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer_for(model), dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    # The merged weight is dequant(W) + s*B@A in fp32; bitsandbytes' CPU 4-bit matmul (the reference side)
    # runs in bf16 on AVX512-BF16 hosts, so the comparison is at bf16 tolerance.
    assert_close(_logits(reloaded, ids), expected, dtype=torch.bfloat16)
    assert not any("absmax" in k for k in json.loads(
        (out / "config.json").read_text()))


def test_merged_4bit_reloads(tmp_path):
    import bitsandbytes.functional as bnbf

    from pronghorn.export.merge import dequantized_weight

    model = lora_model("llama")
    merged = {s.name: s.load() for s in plan_merge(model).sources}
    out = save_pretrained_merged(model, tmp_path / "m4", tokenizer_for(model), save_method="merged_4bit")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    q_proj = reloaded.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    # The stored 4-bit weight is exactly NF4(merged weight): same codes and scales as quantizing it here.
    w = merged["model.layers.0.self_attn.q_proj.weight"]
    expected = bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
    torch.testing.assert_close(dequantized_weight(q_proj).float(), expected.float())
    # unquantized parts (embeddings, norms, lm_head) are the merged values
    torch.testing.assert_close(reloaded.lm_head.weight, merged["lm_head.weight"])
    assert torch.isfinite(_logits(reloaded, input_ids())).all()
