"""Loading a VLM's processor, including on machines where its video processor cannot be built.

transformers builds video processors (and the base class a processor checks them against) only when
torchvision is installed. Processors that declare a video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
therefore cannot be loaded at all without torchvision, even for image-only work. We then load the same
processor class without its video processor: images are processed by the very same code, videos are
refused with a message naming the fix. The class keeps its name; a checkpoint saved this way has no video
processor config, so a machine with torchvision loads it image-only too (with a warning).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

logger = logging.getLogger(__name__)


class VideoUnsupportedError(RuntimeError):
    pass


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


@functools.cache
def image_only_processor(processor_cls: type) -> type:
    """``processor_cls`` without its ``video_processor`` argument (same name, same image and text code).

    Returns ``processor_cls`` itself when it declares no video processor.
    """
    params = inspect.signature(processor_cls.__init__).parameters
    if "video_processor" not in params:
        return processor_cls

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent passes video_processor positionally; ProcessorMixin zips positional arguments with
        # this class's attributes (image_processor, tokenizer), so the None video processor is dropped.
        processor_cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def _process_videos(self, videos, **kwargs):
        raise VideoUnsupportedError(
            f"{processor_cls.__name__} was loaded without its video processor because torchvision is not "
            "installed; videos cannot be processed. Install torchvision (pip install torchvision) and reload."
        )

    namespace = {"__init__": __init__, "_process_videos": _process_videos, "__module__": processor_cls.__module__,
                 "__doc__": processor_cls.__doc__, "_pronghorn_image_only": True}
    return type(processor_cls.__name__, (processor_cls,), namespace)


def _processor_class(source: str, hub_kwargs: dict):
    """The processor class a checkpoint names (processor_config.json), else the one of its model type."""
    import transformers
    from transformers import AutoConfig, ProcessorMixin
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    processor_dict, _ = ProcessorMixin.get_processor_dict(source, **hub_kwargs)
    name = processor_dict.get("processor_class")
    if not name:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
        name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    return getattr(transformers, name, None) if name else None


def load_processor(source: str, **hub_kwargs):
    """``AutoProcessor.from_pretrained(source)``, or the image-only processor where the video processor
    cannot be built: torchvision is missing, or the checkpoint was saved image-only (on a machine without
    torchvision) and has no video processor config to build it from."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        if torchvision_available() and not (isinstance(error, OSError) and "video" in str(error).lower()):
            raise
        cls = _processor_class(source, hub_kwargs)
        if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
            raise
        reason = ("the checkpoint has no video processor config (saved where torchvision was missing?)"
                  if torchvision_available() else "torchvision is not installed")
        logger.warning("%s cannot build its video processor: %s (%s: %s); loading it for images and text only.",
                       cls.__name__, reason, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return image_only_processor(cls).from_pretrained(source, **hub_kwargs)
