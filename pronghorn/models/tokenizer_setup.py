"""Tokenizer fixes applied at load time (each one logged, never silent)."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Tokens that families reserve for padding; tried in order before falling back to unk/eos.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|endoftext|>")


def fix_tokenizer(tokenizer, max_seq_length: int):
    """Give the tokenizer a pad token distinct from EOS where possible, right padding and the length limit."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        choice = next((t for t in _PAD_CANDIDATES if t in vocab and t != tokenizer.eos_token), None)
        if choice is None and tokenizer.unk_token is not None:
            choice = tokenizer.unk_token
        if choice is None:
            choice = tokenizer.eos_token
        tokenizer.pad_token = choice
        logger.warning("The tokenizer had no pad token; using %r (id %d) for padding. Padded positions never "
                       "carry loss.", choice, tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
    return tokenizer


def sync_pad_token(model, tokenizer) -> None:
    """Give the model's text config the tokenizer's pad token when it has none.

    Multimodal configs (Gemma 3, Qwen-VL, ...) keep ``pad_token_id`` on their text config only.
    """
    text_config = model.config.get_text_config()
    if getattr(text_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        text_config.pad_token_id = tokenizer.pad_token_id
