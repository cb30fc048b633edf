"""Tiny random-init models and offline tokenizers for tests (no hub access).

Every supported family gets a config small enough for CPU tests; tokenizers are trained here
from a short built-in corpus so ids are deterministic across runs.
"""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pronghorn fine-tunes language models quickly and exactly.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "User: hello there! Assistant: Hi, how can I help you today?",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, and symbols {}[]()<>|:;'\",.!?-_=+*/\\@#$%^&~`",
    "Les modèles de langue apprennent à prédire le prochain mot. Ünïcödé tëxt wörks too — ok.",
]

SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "[INST]", "[/INST]", "<tool_call>", "</tool_call>", "<think>", "</think>",
]


@functools.lru_cache(maxsize=None)
def _bpe_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def byte_bpe_tokenizer(vocab_size: int = 512, bos="<s>", eos="</s>", pad="<pad>") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the Llama-3 / Qwen style of vocabulary) trained offline."""
    tok = Tokenizer.from_str(_bpe_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>",
        model_max_length=2048,
    )


_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, vocab_size=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILY_OVERRIDES = {
    "llama": dict(),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sliding_window=32, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16),
    "phi3": dict(),
    "lfm2": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], block_ff_dim=128,
                 block_auto_adjust_ff_dim=False, conv_L_cache=3),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[]),
}

FAST_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
GENERIC_FAMILIES = ["lfm2", "qwen3_moe"]


def tiny_config(family: str, **overrides):
    """A small config of ``family`` (a transformers model_type)."""
    kwargs = {**_BASE, **FAMILY_OVERRIDES[family], **overrides}
    if family == "lfm2":
        kwargs.pop("intermediate_size")
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random-init causal LM of ``family``, deterministic for a given seed."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def save_tiny(family: str, path, seed: int = 0, **overrides):
    """Write a tiny model plus tokenizer to ``path`` as a local checkpoint directory; returns the path."""
    model = tiny_model(family, seed=seed, **overrides)
    tok = byte_bpe_tokenizer(vocab_size=model.config.vocab_size)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
