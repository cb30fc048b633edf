"""Vision-language data: image loading, image-size control and the VLM data collator."""
from pronghorn.data.vision.collator import VisionBatchError, VisionDataCollator
from pronghorn.data.vision.examples import ExampleFormatError
from pronghorn.data.vision.images import ImageLoadError, load_image
from pronghorn.data.vision.resize import ImageSizePolicy, resolve_size_policy

__all__ = ["ExampleFormatError", "ImageLoadError", "ImageSizePolicy", "VisionBatchError", "VisionDataCollator",
           "load_image", "resolve_size_policy"]
