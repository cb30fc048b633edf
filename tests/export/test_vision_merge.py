"""Merged 16-bit vision-language checkpoints reload with plain transformers and reproduce the LoRA model.

LoRA sits on the language model and on the vision tower (attention, MLP, projector, patch-embedding conv).
Tolerance: fp32 table x10 (the merge W + s*B@A is done in fp32, so only summation order differs), on the
logits of an image+text input.
"""
import json

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from pronghorn.export.merge import plan_merge
from pronghorn.export.save import save_pretrained_merged
from tests.export.vision_models import (
    VLM_FAMILIES,
    image_inputs,
    lora_vlm,
    tiny_processor,
)
from tests.tolerances import assert_close


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_merged_vlm_reloads_with_same_logits(tmp_path, family):
    model = lora_vlm(family)
    processor = tiny_processor(family)
    inputs = image_inputs(processor, family)
    expected = _logits(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_pretrained_merged(model, tmp_path / "merged", processor)

    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(model.get_base_model()).__name__
    assert_close(_logits(reloaded, inputs), expected, dtype=torch.float32, scale=10)
    # LoRA on vision layers was merged too: the reloaded vision tower differs from the un-adapted base
    merged_names = {s.name for s in plan_merge(model).sources if s.merged}
    assert any("language_model" in n for n in merged_names)
    assert any("visual" in n or "vision_tower" in n for n in merged_names)
    assert any("patch_embed" in n for n in merged_names), "the patch-embedding conv LoRA was not merged"
    # the user's model is untouched
    assert isinstance(model, PeftModel)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # the processor travels along: tokenizer with image tokens, image processor settings, chat template
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "README.md", "generation_config.json"} <= files
    assert "preprocessor_config.json" in files or "processor_config.json" in files
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello")["input_ids"] == processor.tokenizer("hello")["input_ids"]
    image_processor = AutoImageProcessor.from_pretrained(out)
    assert list(image_processor.image_mean) == list(processor.image_processor.image_mean)
    template = (out / "chat_template.jinja").read_text() if (out / "chat_template.jinja").exists() else tok.chat_template
    assert template == processor.chat_template
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "vision_config" in config and "quantization_config" not in config


def test_gemma3_processor_reloads_whole(tmp_path):
    # Qwen-VL processors need torchvision for their video half, so only Gemma 3's reloads whole here.
    model = lora_vlm("gemma3")
    processor = tiny_processor("gemma3")
    out = save_pretrained_merged(model, tmp_path / "m", processor)
    reloaded = AutoProcessor.from_pretrained(out)
    inputs = image_inputs(reloaded, "gemma3")
    expected = image_inputs(processor, "gemma3")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"])


def test_merged_vlm_in_bf16(tmp_path):
    model = lora_vlm("qwen2_vl", dtype=torch.bfloat16)
    processor = tiny_processor("qwen2_vl")
    inputs = image_inputs(processor, "qwen2_vl")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    expected = _logits(model, inputs)
    out = save_pretrained_merged(model, tmp_path / "m", processor)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    # merged then rounded to bf16 once vs. LoRA added at bf16 at run time, through two towers: bf16 x4
    assert_close(_logits(reloaded, inputs), expected, dtype=torch.bfloat16, scale=4)


def test_merged_4bit_keeps_vision_in_16bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = lora_vlm("qwen2_vl")
    processor = tiny_processor("qwen2_vl")
    out = save_pretrained_merged(model, tmp_path / "m4", processor, save_method="merged_4bit")
    config = json.loads((out / "config.json").read_text())
    assert "model.visual" in config["quantization_config"]["llm_int8_skip_modules"]
    reloaded = AutoModelForImageTextToText.from_pretrained(out, device_map="cpu").eval()
    assert type(reloaded.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(reloaded.model.visual.blocks[0].attn.qkv).__name__ == "Linear"
    merged = {s.name: s.load() for s in plan_merge(model).sources}
    torch.testing.assert_close(reloaded.model.visual.blocks[0].attn.qkv.weight,
                               merged["model.visual.blocks.0.attn.qkv.weight"])
    assert torch.isfinite(_logits(reloaded, image_inputs(processor, "qwen2_vl"))).all()
