"""Image-size control: a limit on each image's longest side and/or pixel count, aspect ratio kept.

Images cost memory in proportion to their pixels (Qwen-style models turn every 28x28 pixels into a token),
so the limit is the main memory knob of VLM training. The chosen limit is

- applied to every image of every example before the processor sees it (shrinking, or growing to
  ``min_pixels``), keeping the aspect ratio;
- handed to processors that resize to a pixel budget themselves (their ``size`` takes
  ``shortest_edge``/``longest_edge`` pixel counts, e.g. Qwen2-VL), so the processed image stays within
  ``max_pixels`` after their rounding, and inference uses the same budget;
- logged, and recorded on the image processor as ``pronghorn_image_size`` so ``processor.save_pretrained``
  saves it with the model.

Without an explicit limit nothing is resized here and the processor's own configuration decides (it is
logged and recorded all the same).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from PIL import Image

logger = logging.getLogger(__name__)

RECORD_ATTR = "pronghorn_image_size"


@dataclass(frozen=True)
class ImageSizePolicy:
    """Limits applied to each image; ``None`` fields are not limited.

    Attributes:
        max_image_size: longest side, in pixels, of an image given to the processor.
        min_pixels / max_pixels: bounds on width x height.
        origin: "given" (by the user) or "processor" (read from the processor's configuration, not applied here).
    """

    max_image_size: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    origin: str = "given"

    @property
    def active(self) -> bool:
        return self.origin == "given" and any(v is not None for v in (self.max_image_size, self.min_pixels,
                                                                       self.max_pixels))

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) this policy gives an image of ``width`` x ``height``."""
        if not self.active:
            return width, height
        scale = 1.0
        if self.max_image_size is not None and max(width, height) > self.max_image_size:
            scale = self.max_image_size / max(width, height)
        if self.max_pixels is not None and width * height * scale * scale > self.max_pixels:
            scale = min(scale, math.sqrt(self.max_pixels / (width * height)))
        if self.min_pixels is not None and width * height * scale * scale < self.min_pixels:
            grown = math.sqrt(self.min_pixels / (width * height))
            if self.max_image_size is None or max(width, height) * grown <= self.max_image_size:
                scale = grown
        if scale == 1.0:
            return width, height
        # Round down when shrinking (stay within the limit), up when growing (reach the minimum).
        rounding = math.floor if scale < 1 else math.ceil
        return max(1, int(rounding(width * scale))), max(1, int(rounding(height * scale)))

    def apply(self, image: Image.Image) -> Image.Image:
        size = self.target_size(*image.size)
        if size == image.size:
            return image
        return image.resize(size, Image.Resampling.BICUBIC)

    def as_dict(self) -> dict:
        return asdict(self)


def _size_dict(image_processor) -> dict:
    size = getattr(image_processor, "size", None)
    if size is None:
        return {}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def resizes_to_pixel_budget(image_processor) -> bool:
    """True for image processors that resize each image to a pixel budget (``min_pixels``/``max_pixels``)."""
    valid = getattr(image_processor, "valid_kwargs", None)
    names = set(getattr(valid, "__annotations__", {}) or {})
    return "max_pixels" in names or hasattr(image_processor, "max_pixels")


def processor_default_policy(processor) -> ImageSizePolicy:
    """The limit the processor's own configuration applies (recorded and logged, not applied again)."""
    image_processor = getattr(processor, "image_processor", None)
    size = _size_dict(image_processor) if image_processor is not None else {}
    if image_processor is not None and resizes_to_pixel_budget(image_processor):
        return ImageSizePolicy(min_pixels=size.get("shortest_edge"), max_pixels=size.get("longest_edge"),
                               origin="processor")
    if "height" in size and "width" in size:
        return ImageSizePolicy(max_image_size=max(size["height"], size["width"]), origin="processor")
    if "longest_edge" in size:
        return ImageSizePolicy(max_image_size=size["longest_edge"], origin="processor")
    return ImageSizePolicy(origin="processor")


def _positive(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
    return value


def resolve_size_policy(processor, resize=None, max_image_size=None, min_pixels=None,
                        max_pixels=None) -> ImageSizePolicy:
    """The policy from the collator's arguments; ``resize`` is a shorthand for them.

    ``resize``: ``None`` (use the other arguments, else the processor's configuration), an ``int`` (same as
    ``max_image_size``), a dict with any of ``max_image_size``/``min_pixels``/``max_pixels``, or ``False``
    (never resize here, whatever else is given).
    """
    if resize is False:
        return processor_default_policy(processor)
    if isinstance(resize, bool):
        raise ValueError("resize=True is ambiguous; pass resize=<longest side in pixels>, a dict of limits, or "  # noqa: TRY004
                         "max_image_size= / min_pixels= / max_pixels=")
    if isinstance(resize, int):
        if max_image_size is not None and max_image_size != resize:
            raise ValueError(f"resize={resize} and max_image_size={max_image_size} disagree; pass one")
        max_image_size = resize
    elif isinstance(resize, dict):
        unknown = set(resize) - {"max_image_size", "min_pixels", "max_pixels"}
        if unknown:
            raise ValueError(f"resize dict has unknown keys {sorted(unknown)}; use max_image_size, min_pixels, "
                             "max_pixels")
        max_image_size = resize.get("max_image_size", max_image_size)
        min_pixels = resize.get("min_pixels", min_pixels)
        max_pixels = resize.get("max_pixels", max_pixels)
    elif resize is not None:
        raise ValueError(f"resize={resize!r} is not understood; pass an int (longest side in pixels), a dict "
                         "with max_image_size/min_pixels/max_pixels, False, or None")
    policy = ImageSizePolicy(_positive("max_image_size", max_image_size), _positive("min_pixels", min_pixels),
                             _positive("max_pixels", max_pixels))
    if policy.min_pixels and policy.max_pixels and policy.min_pixels > policy.max_pixels:
        raise ValueError(f"min_pixels={policy.min_pixels} is larger than max_pixels={policy.max_pixels}")
    return policy if policy.active else processor_default_policy(processor)


def install_policy(processor, policy: ImageSizePolicy) -> None:
    """Hand the limit to pixel-budget processors, record it on the image processor, and log it."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return
    if policy.active and resizes_to_pixel_budget(image_processor):
        size = _size_dict(image_processor)
        longest = size.get("longest_edge")
        shortest = size.get("shortest_edge")
        if policy.max_pixels is not None:
            longest = policy.max_pixels if longest is None else min(longest, policy.max_pixels)
        if policy.min_pixels is not None:
            shortest = policy.min_pixels
        if shortest is not None and longest is not None and shortest > longest:
            shortest = longest
        image_processor.size = {"shortest_edge": shortest, "longest_edge": longest}
    setattr(image_processor, RECORD_ATTR, policy.as_dict())
    if policy.active:
        logger.info("pronghorn: images resized to %s (aspect ratio kept; processor size now %s)",
                    {k: v for k, v in policy.as_dict().items() if v is not None and k != "origin"},
                    _size_dict(image_processor))
    else:
        logger.info("pronghorn: images sized by the processor's own configuration %s", _size_dict(image_processor))
