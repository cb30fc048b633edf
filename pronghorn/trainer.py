"""Trainer-side public names, laid out like Unsloth's ``unsloth.trainer`` so ported scripts import unchanged::

    from pronghorn.trainer import UnslothVisionDataCollator, SFTTrainer, SFTConfig
"""
from pronghorn.data.vision.collator import VisionDataCollator
from pronghorn.training.sft import (
    SFTConfig,
    SFTTrainer,
    UnslothTrainer,
    UnslothTrainingArguments,
)

UnslothVisionDataCollator = VisionDataCollator

__all__ = ["SFTConfig", "SFTTrainer", "UnslothTrainer", "UnslothTrainingArguments", "UnslothVisionDataCollator",
           "VisionDataCollator"]
