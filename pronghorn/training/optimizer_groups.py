"""Optimizer parameter groups: a separate learning rate for embeddings and the LM head."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out")


def embedding_param_groups(model, learning_rate: float, embedding_learning_rate: float, weight_decay: float):
    """Split trainable parameters into (other, embedding) groups; embeddings get ``embedding_learning_rate``."""
    embedding, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(part in name for part in _EMBEDDING_NAMES):
            embedding.append(param)
        elif param.ndim < 2 or "bias" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    if not embedding:
        logger.warning("embedding_learning_rate=%g was set but no trainable embed_tokens/lm_head parameters "
                       "exist; add modules_to_save=['lm_head', 'embed_tokens'] to get_peft_model to train them",
                       embedding_learning_rate)
    logger.info("Optimizer groups: %d parameters at lr %g, %d embedding parameters at lr %g",
                len(decay) + len(no_decay), learning_rate, len(embedding), embedding_learning_rate)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": learning_rate},
        {"params": no_decay, "weight_decay": 0.0, "lr": learning_rate},
        {"params": embedding, "weight_decay": 0.0, "lr": embedding_learning_rate},
    ]
    return [g for g in groups if g["params"]]
