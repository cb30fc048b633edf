"""Vision-language benchmark shapes and their random-init checkpoints, built offline.

A shape is a Qwen2.5-VL configuration written out field by field (no hub access) plus the image-processor
settings of its processor. ``build_vlm_checkpoint`` writes, into one folder, the bf16 weights
(``Qwen2_5_VLForConditionalGeneration`` from the config), a byte-level BPE tokenizer carrying Qwen's special
tokens at Qwen's own ids, a Qwen2VL image processor and a chat template, i.e. everything
``AutoModelForImageTextToText`` / ``AutoProcessor`` (and Unsloth's and pronghorn's loaders) read.

Importing this module imports torch and the standard library only: transformers is imported inside the
functions, because Unsloth must be imported before transformers in its own benchmark process.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common

# Qwen2.5's special tokens, in id order from 151643 (the ids the real tokenizer gives them).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Added (not special) tokens that follow them in Qwen2.5's vocabulary.
QWEN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_FIRST_SPECIAL_ID = 151643

# A chat template in Qwen2.5-VL's format (default system turn; each image part becomes
# <|vision_start|><|image_pad|><|vision_end|>), written for this benchmark. Content may be a string or a list
# of {"type": "image" | "text"} parts.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Text the byte-level BPE merges are learned from (a few hundred merges: short English words and chat markup).
_BPE_CORPUS = [
    "Describe the image in detail. The picture shows a street with cars, trees and people walking.",
    "What is written on the sign? The sign says OPEN from nine to five, Monday to Friday.",
    "Read the chart and give the highest value. The highest bar is March with 42 units sold.",
    "How many objects are on the table? There are three cups, two plates and a small green bottle.",
    "Answer the question about the document: the invoice total is 1,284.50 dollars, due on the 15th.",
    "Hello! Can you help me write a short poem about the sea? Of course: waves fold the light into foam.",
    "system user assistant You are a helpful assistant. Compare the two images and list the differences.",
]


@dataclass(frozen=True)
class VLMShape:
    """A Qwen2.5-VL-family shape: config fields, processor settings and the default workload."""

    name: str
    text_config: dict
    vision_config: dict
    image_processor: dict  # Qwen2VL image processor kwargs (patch/merge sizes, pixel limits)
    min_side: int  # images are drawn with each side uniform in [min_side, max_side] pixels
    max_side: int
    batch_size: int
    bpe_vocab: int  # size of the learned byte-level BPE vocabulary (before fillers and special tokens)
    special_token_start: int | None  # id of the first special token (None: right after the BPE vocabulary)
    notes: str = ""
    extra: dict = field(default_factory=dict)  # top-level config fields besides the token ids


QWEN2_5_VL_7B = VLMShape(
    name="qwen2.5-vl-7b",
    # Qwen2.5-VL-7B-Instruct's config.json, field by field (transformers 5 names: rope_parameters).
    text_config=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
        hidden_act="silu", attention_dropout=0.0, use_sliding_window=False, sliding_window=32768,
        max_window_layers=28, initializer_range=0.02, bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu", initializer_range=0.02,
    ),
    # preprocessor_config.json of Qwen2.5-VL-7B-Instruct: CLIP mean/std, 14 px patches merged 2x2,
    # min_pixels 3136 (56^2), max_pixels 12845056 (so 448..1024 px images are not shrunk).
    image_processor=dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056),
    min_side=448, max_side=1024, batch_size=4, bpe_vocab=1024, special_token_start=QWEN_FIRST_SPECIAL_ID,
    notes="Qwen2.5-VL-7B-Instruct architecture, random init; tokenizer is a small byte-level BPE with Qwen's "
          "special tokens at Qwen's ids (151643..151664) and the model keeps vocab 152064",
)

TINY = VLMShape(
    name="tiny",
    text_config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1152, max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
        use_sliding_window=False, max_window_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    ),
    vision_config=dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=64,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        tokens_per_second=2, hidden_act="silu",
    ),
    image_processor=dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                         max_pixels=112 * 112),
    min_side=56, max_side=112, batch_size=4, bpe_vocab=1024, special_token_start=None,
    notes="CPU smoke-test shape: the same architecture with tiny sizes",
)

VLM_SHAPES = {s.name: s for s in (QWEN2_5_VL_7B, TINY)}


def get_vlm_shape(name: str) -> VLMShape:
    if name not in VLM_SHAPES:
        raise ValueError(f"unknown VLM shape {name!r}; known: {sorted(VLM_SHAPES)}")
    return VLM_SHAPES[name]


# ---------------------------------------------------------------------------------------------
# Tokenizer, processor, config
# ---------------------------------------------------------------------------------------------

def build_tokenizer(shape: VLMShape):
    """A byte-level BPE tokenizer with Qwen's special tokens (at Qwen's ids when the shape asks for them,
    with never-produced filler entries in between) and Qwen-VL's named vision tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape.bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_BPE_CORPUS * 4, trainer=trainer)
    if shape.special_token_start is not None:
        state = json.loads(tok.to_str())
        vocab = state["model"]["vocab"]
        # Fillers hold the ids between the learned vocabulary and Qwen's first special token; no merge makes them.
        for i in range(len(vocab), shape.special_token_start):
            vocab[f"<|filler_{i}|>"] = i
        tok = Tokenizer.from_str(json.dumps(state))
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tok.add_tokens(QWEN_ADDED_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    start = shape.special_token_start
    if start is not None and fast.convert_tokens_to_ids("<|image_pad|>") != start + 12:
        raise AssertionError(f"<|image_pad|> landed at id {fast.convert_tokens_to_ids('<|image_pad|>')}, "
                             f"expected {start + 12} (Qwen's id)")
    if len(fast) > shape.text_config["vocab_size"]:
        raise ValueError(f"tokenizer has {len(fast)} tokens but shape {shape.name} has vocab_size "
                         f"{shape.text_config['vocab_size']}; raise vocab_size or lower bpe_vocab")
    return fast


def build_processor(shape: VLMShape, tokenizer):
    """A Qwen2.5-VL processor: Qwen2VL image processor with the shape's settings, ``tokenizer``, our chat
    template; with a video processor where transformers can build one (it needs torchvision)."""
    import transformers
    from transformers import Qwen2_5_VLProcessor

    from pronghorn.models.vision.processors import (
        image_only_processor,
        torchvision_available,
    )

    ip = dict(shape.image_processor)
    size = {"shortest_edge": ip.pop("min_pixels"), "longest_edge": ip.pop("max_pixels")}
    # Without torchvision, transformers' default Qwen2VL image processor falls back to the PIL one (with a
    # warning); asking for the PIL class directly gives the same processor quietly.
    if torchvision_available():
        cls = transformers.Qwen2VLImageProcessor
    else:
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
                Qwen2VLImageProcessorPil as cls,
            )
        except ImportError:  # older transformers: the default class is the PIL one already
            cls = transformers.Qwen2VLImageProcessor
    image_processor = cls(size=size, **ip)
    if torchvision_available():
        video_processor = transformers.Qwen2VLVideoProcessor()
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor, chat_template=QWEN_VL_CHAT_TEMPLATE)
    return image_only_processor(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                      chat_template=QWEN_VL_CHAT_TEMPLATE)


def build_config(shape: VLMShape, tokenizer):
    """The shape's ``Qwen2_5_VLConfig``; token ids are read from ``tokenizer`` (Qwen's ids for the 7B shape)."""
    from transformers import Qwen2_5_VLConfig

    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(shape.text_config)
    text.setdefault("bos_token_id", tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    text.setdefault("eos_token_id", tokenizer.eos_token_id)
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(shape.vision_config), tie_word_embeddings=False,
                            **ids, **shape.extra)


# ---------------------------------------------------------------------------------------------
# Checkpoint on disk
# ---------------------------------------------------------------------------------------------

MARKER = "pronghorn_vlm_bench_shape.json"


def _marker(shape: VLMShape) -> dict:
    return {"shape": shape.name, "text_config": shape.text_config, "vision_config": shape.vision_config,
            "image_processor": shape.image_processor, "bpe_vocab": shape.bpe_vocab,
            "special_token_start": shape.special_token_start}


def checkpoint_is_current(shape: VLMShape, path) -> bool:
    """True when ``path`` holds a complete checkpoint this module built for exactly ``shape``."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == json.loads(json.dumps(_marker(shape)))


def build_vlm_checkpoint(shape: VLMShape, path, device: str | None = None, seed: int = 0) -> dict:
    """Write a random-init bf16 checkpoint of ``shape`` with its processor to ``path``; returns timings (s).

    Weights are created directly on ``device`` (default CUDA when present) in bf16, so the 8B shape
    initialises in seconds. The marker file is written last: an interrupted build is never reused.
    """
    from transformers import AutoModelForImageTextToText

    path, device = common.prepare_build(path, device)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(shape)
    processor = build_processor(shape, tokenizer)
    config = build_config(shape, tokenizer)
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    common.sync(device)
    t2 = time.perf_counter()
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    t3 = time.perf_counter()
    processor.save_pretrained(path)
    (path / MARKER).write_text(json.dumps(_marker(shape), indent=1))
    return {"processor_s": t1 - t0, "init_s": t2 - t1, "save_s": t3 - t2, "n_params": n_params,
            "tokenizer_len": len(tokenizer)}


def ensure_checkpoint(shape: VLMShape, path, force: bool = False) -> dict | None:
    """Build the checkpoint unless a current one is already at ``path``; returns the build timings or None."""
    if not force and checkpoint_is_current(shape, path):
        return None
    return build_vlm_checkpoint(shape, path)
