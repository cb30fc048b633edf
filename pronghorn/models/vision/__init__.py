"""Vision-language models: FastVisionModel, per-family specs, LoRA target selection, fast-path patching."""
from pronghorn.models.vision.fast_vision_model import FastVisionModel

__all__ = ["FastVisionModel"]
