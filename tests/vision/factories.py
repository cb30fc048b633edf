"""Tiny random-init vision-language models and offline processors, one per supported family.

Each family is built from its transformers config classes with a few layers and tiny hidden sizes, and its
processor from the family's own processor class, the PIL image processor (torchvision is absent here) with
a small image size, and a byte-level BPE tokenizer (``tests.factories``) carrying the family's special
image tokens and a chat template written here with the family's image placeholders.

The Qwen processors declare a video processor, which transformers can only build with torchvision; they
are built through ``pronghorn.models.vision.processors.image_only_processor`` (the same class without its
video processor), the path ``FastVisionModel`` takes on machines without torchvision.

Other suites (VLM export) import :func:`tiny_vlm`, :func:`save_tiny_vlm` and :data:`VLM_FAMILIES`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    PreTrainedTokenizerFast,
)

from tests.factories import _bpe_tokenizer_json

# ------------------------------------------------------------------------------------------ templates
# Written for these tests: each renders string or list-of-parts content and the family's image placeholder.

_PARTS = ("{%- macro parts(content, image) -%}{%- if content is string -%}{{ content }}{%- else -%}"
          "{%- for p in content -%}{%- if p.type == 'image' -%}{{ image }}{%- elif p.type == 'text' -%}"
          "{{ p.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")

CHATML_VISION = _PARTS + (
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n"
    "{{ parts(m.content, '<|vision_start|><|image_pad|><|vision_end|>') }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}"
)
GEMMA3_VISION = _PARTS + (
    "{{ bos_token }}{%- for m in messages -%}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{{ parts(m.content, '<start_of_image>') }}<end_of_turn>\n{% endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{% endif -%}"
)
LLAMA3_VISION = _PARTS + (
    "<|begin_of_text|>{%- for m in messages -%}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ parts(m.content, '<|image|>') }}<|eot_id|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif -%}"
)
LLAVA_VISION = _PARTS + (
    "{%- for m in messages -%}{%- if m.role == 'user' -%}USER: {{ parts(m.content, '<image>\n') }} "
    "{%- else -%}ASSISTANT: {{ parts(m.content, '') }}</s>{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)
MISTRAL_VISION = _PARTS + (
    "<s>{%- for m in messages -%}{%- if m.role == 'user' -%}[INST]{{ parts(m.content, '[IMG]') }}[/INST]"
    "{%- else -%}{{ parts(m.content, '') }}</s>{%- endif -%}{%- endfor -%}"
)

# ------------------------------------------------------------------------------------------ tokenizer

_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512}


def vision_tokenizer(extra_tokens: dict[str, str], eos: str, bos: str | None = None, pad: str = "<pad>",
                     more: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer plus the family's special image tokens (as named attributes, e.g.
    ``tokenizer.image_token``) and any ``more`` special tokens."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_tokenizer_json(512)), bos_token=bos, eos_token=eos,
        pad_token=pad, unk_token="<unk>", model_max_length=4096, extra_special_tokens=dict(extra_tokens),
    )
    missing = [t for t in more if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def _ids(tok, **names) -> dict[str, int]:
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


# ------------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class VisionFamily:
    """How to build one family's tiny model and processor."""

    name: str  # transformers model_type of the VLM
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    processor: Callable[[PreTrainedTokenizerFast], object]
    config: Callable[[PreTrainedTokenizerFast], object]
    image_token: str  # the token that stands for image features in input_ids
    notes: dict = field(default_factory=dict)


def _qwen_tokenizer():
    return vision_tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                             "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
                            eos="<|im_end|>")


def _qwen_processor(processor_cls_name: str, patch_size: int):
    def build(tok):
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        from pronghorn.models.vision.processors import image_only_processor

        factor = patch_size * 2
        image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=factor * factor, max_pixels=factor * factor * 16)
        cls = image_only_processor(getattr(transformers, processor_cls_name))
        return cls(image_processor=image_processor, tokenizer=tok, chat_template=CHATML_VISION)
    return build


def _qwen_config(model_type: str, patch_size: int):
    def build(tok):
        ids = _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                   vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
        text = dict(_TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 3, 3]})
        vision = {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": patch_size, "spatial_merge_size": 2,
                      "temporal_patch_size": 2}
        if model_type == "qwen2_vl":
            vision.update(embed_dim=32, mlp_ratio=2)
        elif model_type == "qwen2_5_vl":
            vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=4 * patch_size,
                          fullatt_block_indexes=[1])
        else:  # qwen3_vl
            vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64,
                          deepstack_visual_indexes=[0])
            text["rope_parameters"]["mrope_interleaved"] = True
        return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **ids,
                                    tie_word_embeddings=False)
    return build


def _gemma3_tokenizer():
    return vision_tokenizer({"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                             "eoi_token": "<end_of_image>"}, eos="<end_of_turn>", bos="<bos>")


def _gemma3_processor(tok):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import (
        Gemma3ImageProcessorPil,
    )

    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_VISION,
                           image_seq_length=4)


def _gemma3_config(tok):
    text = dict(_TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, sliding_window=32, query_pre_attn_scalar=16)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14, "vision_use_head": False}
    return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                                image_token_index=tok.image_token_id)


def _mllama_tokenizer():
    return vision_tokenizer({"image_token": "<|image|>"}, eos="<|eot_id|>", bos="<|begin_of_text|>",
                            more=("<|python_tag|>",))


def _mllama_processor(tok):
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import (
        MllamaImageProcessorPil,
    )

    image_processor = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=LLAMA3_VISION)


def _mllama_config(tok):
    text = dict(_TEXT, num_hidden_layers=3, cross_attention_layers=[1], vocab_size=len(tok),
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    text.pop("head_dim")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
                  "attention_heads": 2, "image_size": 28, "patch_size": 14, "max_num_tiles": 2,
                  "intermediate_layers_indices": [0], "vision_output_dim": 64,
                  "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]}
    return AutoConfig.for_model("mllama", text_config=text, vision_config=vision,
                                image_token_index=tok.image_token_id)


def _llava_tokenizer():
    return vision_tokenizer({"image_token": "<image>"}, eos="</s>", bos="<s>")


def _llava_processor(tok):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import (
        LlavaImageProcessorPil,
    )

    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=LLAVA_VISION,
                          patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _llava_config(tok):
    text = dict(_TEXT, model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "projection_dim": 32}
    return AutoConfig.for_model("llava", text_config=text, vision_config=vision,
                                image_token_index=tok.image_token_id, vision_feature_layer=-1,
                                vision_feature_select_strategy="default", tie_word_embeddings=False)


def _pixtral_tokenizer():
    return vision_tokenizer({"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
                             "image_end_token": "[IMG_END]"}, eos="</s>", bos="<s>")


def _pixtral_processor(merge: int):
    def build(tok):
        from transformers import PixtralProcessor
        from transformers.models.pixtral.image_processing_pil_pixtral import (
            PixtralImageProcessorPil,
        )

        image_processor = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=14)
        return PixtralProcessor(image_processor=image_processor, tokenizer=tok, chat_template=MISTRAL_VISION,
                                patch_size=14, spatial_merge_size=merge)
    return build


def _pixtral_vision():
    return {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "head_dim": 16, "image_size": 56, "patch_size": 14}


def _llava_pixtral_config(tok):
    text = dict(_TEXT, model_type="mistral", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, sliding_window=None)
    return AutoConfig.for_model("llava", text_config=text, vision_config=_pixtral_vision(),
                                image_token_index=tok.image_token_id, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", tie_word_embeddings=False)


def _mistral3_config(tok):
    text = dict(_TEXT, model_type="mistral", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, sliding_window=None)
    return AutoConfig.for_model("mistral3", text_config=text, vision_config=_pixtral_vision(),
                                image_token_index=tok.image_token_id, vision_feature_layer=-1,
                                spatial_merge_size=2, tie_word_embeddings=False)


VLM_FAMILY_SPECS: dict[str, VisionFamily] = {
    "qwen2_vl": VisionFamily("qwen2_vl", _qwen_tokenizer, _qwen_processor("Qwen2VLProcessor", 14),
                             _qwen_config("qwen2_vl", 14), "<|image_pad|>"),
    "qwen2_5_vl": VisionFamily("qwen2_5_vl", _qwen_tokenizer, _qwen_processor("Qwen2_5_VLProcessor", 14),
                               _qwen_config("qwen2_5_vl", 14), "<|image_pad|>"),
    "qwen3_vl": VisionFamily("qwen3_vl", _qwen_tokenizer, _qwen_processor("Qwen3VLProcessor", 16),
                             _qwen_config("qwen3_vl", 16), "<|image_pad|>"),
    "gemma3": VisionFamily("gemma3", _gemma3_tokenizer, _gemma3_processor, _gemma3_config, "<image_soft_token>"),
    "mllama": VisionFamily("mllama", _mllama_tokenizer, _mllama_processor, _mllama_config, "<|image|>"),
    "llava": VisionFamily("llava", _llava_tokenizer, _llava_processor, _llava_config, "<image>"),
    "llava_pixtral": VisionFamily("llava", _pixtral_tokenizer, _pixtral_processor(1), _llava_pixtral_config,
                                  "[IMG]"),
    "mistral3": VisionFamily("mistral3", _pixtral_tokenizer, _pixtral_processor(2), _mistral3_config, "[IMG]"),
}
VLM_FAMILIES = list(VLM_FAMILY_SPECS)


@functools.cache
def _cached_config_dict(family: str):
    spec = VLM_FAMILY_SPECS[family]
    return spec.config(spec.tokenizer()).to_dict()


def tiny_processor(family: str):
    """The family's processor (image processor + tokenizer with image tokens + chat template), built offline."""
    spec = VLM_FAMILY_SPECS[family]
    return spec.processor(spec.tokenizer())


def tiny_vlm(family: str, seed: int = 0, dtype=torch.float32):
    """``(model, processor)``: a random-init ``AutoModelForImageTextToText`` of ``family`` and its processor."""
    spec = VLM_FAMILY_SPECS[family]
    tok = spec.tokenizer()
    processor = spec.processor(tok)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(spec.config(tok), dtype=dtype)
    return model.eval(), processor


def tiny_vlm_model(family: str, seed: int = 0, dtype=torch.float32):
    """A random-init model of ``family`` without its processor (for families whose processor cannot be built
    here, see ``NO_PROCESSOR_HERE``)."""
    spec = VLM_FAMILY_SPECS[family]
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(spec.config(spec.tokenizer()), dtype=dtype).eval()


def save_tiny_vlm(family: str, path, seed: int = 0):
    """Write a tiny VLM and its processor to ``path`` (a local checkpoint directory); returns the path."""
    model = tiny_vlm_model(family, seed=seed)
    model.save_pretrained(path)
    if family in NO_PROCESSOR_HERE:
        VLM_FAMILY_SPECS[family].tokenizer().save_pretrained(path)
    else:
        tiny_processor(family).save_pretrained(path)
    return path


def sample_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """A small deterministic RGB image (a colour gradient plus noise, so pixels differ)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 64, (height, width, 3), generator=g)
    ramp = torch.linspace(0, 191, width).view(1, width, 1).expand(height, width, 3)
    data = (noise + ramp).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(data, mode="RGB")


# ------------------------------------------------------------------------------------------ data helpers

# PixtralProcessor (Mistral 3, Pixtral-in-Llava) imports torchvision when its module loads in transformers
# 5.23, so it cannot be built on this machine; those families are tested on hand-built inputs instead.
NO_PROCESSOR_HERE = {
    "llava_pixtral": "PixtralProcessor needs torchvision (imported at module load in transformers 5.23)",
    "mistral3": "PixtralProcessor needs torchvision (imported at module load in transformers 5.23)",
}
PROCESSOR_FAMILIES = [f for f in VLM_FAMILIES if f not in NO_PROCESSOR_HERE]


def mixed_examples(seed: int = 0) -> list[dict]:
    """Four chat examples: one image (in the part), none (text-only), three (from the ``images`` column),
    and text-only again with list-of-parts content. Images have different sizes."""
    a, b, c, d = (sample_image(40 + 8 * i, 30 + 6 * i, seed + i) for i in range(4))
    return [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A red fox."}]}]},
        {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, how?"}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                                   {"type": "image"}, {"type": "image"}]},
                      {"role": "assistant", "content": "The dog is quick."}], "images": [b, c, d]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Numbers 1 2 3"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "4 5 6"}]}]},
    ]


def pixtral_manual_batch(family: str, seed: int = 0) -> dict:
    """Model inputs for the Pixtral-vision families built by hand (no processor here): two rows, the
    first with one image (56 px for Mistral 3: one 28 px image would be a single merged feature, which
    transformers' Mistral 3 squeezes away) laid out as Pixtral's processor does ([IMG] per feature, [IMG_BREAK] after
    each row of features, [IMG_END] last), the second text-only, right-padded."""
    spec = VLM_FAMILY_SPECS[family]
    tok = spec.tokenizer()
    merge, pixels = (2, 56) if family == "mistral3" else (1, 28)
    side = pixels // 14 // merge
    img, brk, end = (tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    image_ids = []
    for r in range(side):
        image_ids += [img] * side + [end if r == side - 1 else brk]
    text = tok("describe the fox", add_special_tokens=False)["input_ids"]
    answer = tok(" a quick brown fox</s>", add_special_tokens=False)["input_ids"]
    row0 = [tok.bos_token_id] + tok("[INST]", add_special_tokens=False)["input_ids"] + image_ids + text + \
        tok("[/INST]", add_special_tokens=False)["input_ids"] + answer
    row1 = [tok.bos_token_id] + tok("[INST]hello[/INST] hi there</s>", add_special_tokens=False)["input_ids"]
    length = max(len(row0), len(row1))
    ids = torch.full((2, length), tok.pad_token_id)
    mask = torch.zeros((2, length), dtype=torch.long)
    for i, row in enumerate((row0, row1)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = ids.clone()
    labels[mask == 0] = -100
    for token in (img, brk, end):
        labels[ids == token] = -100
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(1, 3, pixels, pixels, generator=g),
            "image_sizes": torch.tensor([[pixels, pixels]])}
