"""Tiny random-init vision-language models, offline processors and LoRA wrappers for export tests.

Families: Qwen2-VL, Qwen2.5-VL and Gemma 3 (vision). Sizes are multiples of 32 so q8_0 applies to every
matrix; vision intermediate sizes differ from the hidden size (llama.cpp's clip loader takes an FFN
whose down projection maps hidden -> hidden for a legacy layout and swaps it).
Processors are built in code: the byte-level BPE tokenizer from ``tests.factories`` plus the family's
image tokens and a chat template with image placeholders, and the image processors' PIL backends
(no torchvision here).
"""
from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    Gemma3Processor,
    PreTrainedTokenizerFast,
    Qwen2VLProcessor,
)

from tests.export.helpers import randomize_lora_b
from tests.factories import byte_bpe_tokenizer

VLM_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "gemma3"]
VOCAB = 544   # 512 trained pieces + the image tokens, rounded up to a multiple of 32

QWEN_IMAGE_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GEMMA_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]

QWEN_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
GEMMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": VOCAB}
PATCH = 14


def vlm_tokenizer(family: str):
    """The offline byte-level BPE tokenizer with ``family``'s image tokens added as special tokens."""
    if family == "gemma3":
        base = byte_bpe_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>")
        base.add_special_tokens({"additional_special_tokens": GEMMA_IMAGE_TOKENS})
        # Gemma3Processor reads boi/eoi/image tokens as named special tokens; named ones survive save/reload.
        tok = PreTrainedTokenizerFast(
            tokenizer_object=base.backend_tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
            unk_token="<unk>", model_max_length=2048,
            extra_special_tokens=dict(zip(("boi_token", "eoi_token", "image_token"), GEMMA_IMAGE_TOKENS)))
        tok.chat_template = GEMMA3_TEMPLATE
    else:
        tok = byte_bpe_tokenizer(eos="<|im_end|>")
        tok.add_special_tokens({"additional_special_tokens": QWEN_IMAGE_TOKENS})
        tok.chat_template = QWEN_VL_TEMPLATE
    assert len(tok) <= VOCAB
    return tok


def tiny_vlm_config(family: str):
    """A small config of ``family`` whose special token ids match :func:`vlm_tokenizer`."""
    tok = vlm_tokenizer(family)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if family == "gemma3":
        boi, eoi, image = tok.convert_tokens_to_ids(GEMMA_IMAGE_TOKENS)
        return AutoConfig.for_model(
            "gemma3", text_config=dict(_TEXT, head_dim=16, sliding_window=32, query_pre_attn_scalar=16, **ids),
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "image_size": 4 * PATCH, "patch_size": PATCH, "vision_use_head": False},
            mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image, **ids)
    start, end, image, video = tok.convert_tokens_to_ids(QWEN_IMAGE_TOKENS)
    text = dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, **ids)
    if family == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2, "patch_size": PATCH,
                      "spatial_merge_size": 2, "temporal_patch_size": 2}
    elif family == "qwen2_5_vl":
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                      "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [1],
                      "window_size": 112}
    else:
        raise ValueError(f"unknown VLM family {family!r}; choose from {VLM_FAMILIES}")
    return AutoConfig.for_model(family, text_config=text, vision_config=vision, image_token_id=image,
                                video_token_id=video, vision_start_token_id=start, vision_end_token_id=end, **ids)


def tiny_vlm(family: str, seed: int = 0, dtype=torch.float32):
    """A random-init ``AutoModelForImageTextToText`` of ``family``, deterministic for a seed."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_vlm_config(family), dtype=dtype)
    # Constant-initialised tensors (norm weights, biases, Gemma 3's zero projection) get noise, so a
    # converter that drops a norm offset, a bias or a transpose cannot pass by accident.
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            constant = p.numel() == 1 or float(p.float().std()) == 0.0
            if p.is_floating_point() and constant:
                p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype))
    return model.eval()


class _QwenProcessorWithoutVideo:
    """Builds Qwen2-VL / Qwen2.5-VL processors without a video processor (those need torchvision)."""

    @staticmethod
    def build(processor_cls, image_processor, tokenizer, chat_template):
        class NoVideo(processor_cls):
            def __init__(self, image_processor, tokenizer, chat_template=None):
                self.image_token = tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
                self.video_token = "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                super(processor_cls, self).__init__(image_processor, tokenizer, chat_template=chat_template)

        NoVideo.__name__ = processor_cls.__name__
        return NoVideo(image_processor, tokenizer, chat_template=chat_template)


def tiny_processor(family: str):
    """An offline processor of ``family`` (image processor + tokenizer + chat template with image placeholders)."""
    tok = vlm_tokenizer(family)
    if family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        ip = Gemma3ImageProcessorPil(size={"height": 4 * PATCH, "width": 4 * PATCH}, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3, do_pan_and_scan=False)
        return Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448, patch_size=PATCH, merge_size=2,
                                  temporal_patch_size=2)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as cls
    else:
        cls = Qwen2VLProcessor
    return _QwenProcessorWithoutVideo.build(cls, ip, tok, QWEN_VL_TEMPLATE)


# LoRA on the language model and on the vision tower: attention, MLP, projector and the patch-embedding conv.
VLM_LORA_TARGETS = (r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|proj|fc1|fc2|out_proj"
                    r"|patch_embedding|mlp\.0|mlp\.2)$")


def lora_vlm(family: str, seed: int = 0, r: int = 4, dtype=torch.float32):
    """A tiny ``family`` VLM with LoRA on language and vision layers, every lora_B random (non-zero delta)."""
    model = tiny_vlm(family, seed=seed, dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=VLM_LORA_TARGETS, lora_dropout=0.0)
    return randomize_lora_b(get_peft_model(model, cfg), seed + 1, 0.05)


def sample_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB test image (gradients plus noise), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def image_size_for(family: str) -> tuple[int, int]:
    """(width, height) of the test image: a size no resizing step changes (patch/merge multiples, square for Gemma 3).

    Qwen2.5-VL's 224x112 spans two 112-pixel attention windows, so window attention is exercised.
    """
    return (4 * PATCH, 4 * PATCH) if family == "gemma3" else (16 * PATCH, 8 * PATCH)


def image_inputs(processor, family: str, seed: int = 0, text: str = "Describe this image.") -> dict:
    """Processor outputs for one user turn with one test image and ``text``."""
    image = sample_image(*image_size_for(family), seed=seed)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[prompt], images=[image], return_tensors="pt"))


def hf_image_features(model, inputs: dict) -> torch.Tensor:
    """Projected image embeddings ``(n_image_tokens, text_hidden)`` from the HF model (PEFT wrapper allowed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"pixel_values": inputs["pixel_values"]}
    if "image_grid_thw" in inputs:
        kwargs["image_grid_thw"] = inputs["image_grid_thw"]
    with torch.no_grad():
        out = base.get_image_features(**kwargs)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats), dim=0)
    return feats.reshape(-1, feats.shape[-1]).float()
