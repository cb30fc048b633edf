"""VisionDataCollator: chat examples with any number of images (none included) -> a training batch for a VLM.

Per batch: each example is parsed (``examples.py``), its images loaded (``images.py``) and resized
(``resize.py``), its messages rendered with the processor's chat template, and the checks run that
name the example (placeholder count vs images given, unreadable images, images for a text-only
processor). Then the processor processes the whole batch at once, so it pads text and batches pixels
its own way, and labels are built: padding and every multimodal token never carry loss; with
``train_on_responses_only`` only assistant turns do (the template-derived markers of
``pronghorn.data.responses_only``).
"""
from __future__ import annotations

import copy
import inspect
import logging
import warnings

import torch

from pronghorn.data.vision.examples import (
    ExampleFormatError,
    ParsedExample,
    parse_example,
)
from pronghorn.data.vision.images import load_image
from pronghorn.data.vision.resize import install_policy, resolve_size_policy

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MM_WORDS = ("image", "video", "vision", "boi", "eoi", "img")
# Model-config attributes that name multimodal token ids.
_CONFIG_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                       "vision_end_token_id", "boi_token_index", "eoi_token_index", "image_break_token_id",
                       "image_end_token_id")
# Batch entries aligned with input_ids on (batch, sequence): truncated together with it.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids",
                  "cross_attention_mask", "position_ids")


class VisionBatchError(ValueError):
    """A batch cannot be built; the message names the example and what would be right."""


class VisionDataCollator:
    """Collate chat examples with images into VLM training batches (Unsloth: ``UnslothVisionDataCollator``).

    Args:
        model: the model being trained (its config supplies image-token ids and ``max_seq_length``);
            may be None.
        processor: the model's processor (``FastVisionModel.from_pretrained`` returns it).
        max_seq_length: longest tokenized example (image tokens included); None takes ``model.max_seq_length``.
            Longer examples are truncated when the cut falls after their last image token, and refused
            otherwise (a cut image would not match its features).
        train_on_responses_only: loss on assistant turns only.
        instruction_part / response_part / end_part: markers for that masking; derived from the processor's
            chat template when omitted.
        resize / max_image_size / min_pixels / max_pixels: image-size limits (see
            ``pronghorn.data.vision.resize``); default: the processor's own configuration.
        ignore_index: label of tokens without loss.
        pad_to_multiple_of: pad the sequence length to a multiple of this.

    Examples hold ``messages`` (contents are strings or lists of ``{"type": "text"|"image", ...}`` parts) and
    optionally an ``images`` column for image parts given without payload, or ``text`` + ``images``.
    Any mix of text-only and image examples, with any number of images each, may share a batch.
    """

    def __init__(self, model, processor, max_seq_length: int | None = None, train_on_responses_only: bool = False,
                 instruction_part=None, response_part=None, end_part=None, resize=None,
                 max_image_size: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None):
        if processor is None:
            raise ValueError("VisionDataCollator needs the model's processor (FastVisionModel.from_pretrained "
                             "returns (model, processor))")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token; set processor.tokenizer.pad_token (or load "
                             "with FastVisionModel.from_pretrained, which sets one)")
        if max_seq_length is None and model is not None:
            max_seq_length = getattr(model, "max_seq_length", None)
        self.max_seq_length = max_seq_length
        self.ignore_index = ignore_index
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_layout = _image_layout(processor)
        self.image_placeholder = getattr(processor, "image_token", None) if self.image_layout else None
        self.multimodal_token_ids = _multimodal_token_ids(processor, self.tokenizer, model)
        self.size_policy = resolve_size_policy(processor, resize, max_image_size, min_pixels, max_pixels)
        if self.image_layout:
            install_policy(processor, self.size_policy)
        if model is not None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            record = dict(getattr(base, "_pronghorn_load", {}) or {})
            record["image_size"] = self.size_policy.as_dict()
            base._pronghorn_load = record
        self.train_on_responses_only = train_on_responses_only
        self.response_parts = None
        if train_on_responses_only:
            from pronghorn.data.markers import resolve_parts

            self._template_tokenizer = _with_processor_template(self.tokenizer, processor)
            self.response_parts = resolve_parts(self._template_tokenizer, instruction_part, response_part, end_part)
            logger.info("pronghorn: training on responses only: %s", self.response_parts.describe())
        self._examples_seen = 0

    # ----------------------------------------------------------------------------------------- per example

    def _render(self, parsed: ParsedExample) -> str:
        if parsed.messages is None:
            return parsed.text
        return self.processor.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=False)

    def _check_counts(self, parsed: ParsedExample, text: str) -> None:
        n_images = len(parsed.image_sources)
        if n_images and not self.image_layout:
            raise VisionBatchError(
                f"example {parsed.index} has {n_images} image(s) but {type(self.processor).__name__} is a text-only "
                "processor (no image processor). Load the model with FastVisionModel.from_pretrained and pass "
                "the processor it returns, or drop the images"
            )
        if n_images and self.model is not None and _is_text_only_model(self.model):
            raise VisionBatchError(
                f"example {parsed.index} has {n_images} image(s) but the model "
                f"({type(self.model).__name__}) has no vision tower; use a vision-language model "
                "(FastVisionModel.from_pretrained) or drop the images"
            )
        if parsed.video_sources and getattr(self.processor, "video_processor", None) is None:
            raise VisionBatchError(
                f"example {parsed.index} has {len(parsed.video_sources)} video(s) but this processor cannot process "
                "videos (it has no video processor; for Qwen-VL processors install torchvision)"
            )
        if self.image_placeholder:
            found = text.count(self.image_placeholder)
            if found != n_images:
                raise VisionBatchError(
                    f"example {parsed.index}: its text has {found} image placeholder(s) "
                    f"({self.image_placeholder!r}) but {n_images} image(s) were given; each image needs exactly "
                    "one placeholder (a {'type': 'image'} part in the messages)"
                )

    # ----------------------------------------------------------------------------------------------- batch

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise VisionBatchError("the collator got an empty batch")
        start = self._examples_seen
        self._examples_seen += len(examples)
        parsed, texts, images, videos = [], [], [], []
        for row, example in enumerate(examples):
            try:
                item = parse_example(example, start + row)
            except ExampleFormatError as error:
                raise VisionBatchError(str(error)) from error
            text = self._render(item)
            self._check_counts(item, text)
            parsed.append(item)
            texts.append(text)
            images.append([self.size_policy.apply(load_image(src, item.index)) for src in item.image_sources])
            videos.append(list(item.video_sources))
        batch = self._process(texts, images, videos)
        batch = self._truncate(batch, parsed)
        batch["labels"] = self._labels(batch, parsed)
        return dict(batch)

    def _process(self, texts, images, videos):
        kwargs = {"text": texts, "padding": True, "return_tensors": "pt", "add_special_tokens": False}
        if self.pad_to_multiple_of:
            kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        if any(images):
            kwargs["images"] = images if self.image_layout == "nested" else [i for imgs in images for i in imgs]
        if any(videos):
            kwargs["videos"] = videos if self.image_layout == "nested" else [v for vs in videos for v in vs]
        padding_side = getattr(self.tokenizer, "padding_side", "right")
        self.tokenizer.padding_side = "right"  # labels and truncation below assume right padding
        try:
            return self.processor(**kwargs)
        finally:
            self.tokenizer.padding_side = padding_side

    def _truncate(self, batch, parsed):
        limit = self.max_seq_length
        input_ids = batch["input_ids"]
        if limit is None or input_ids.shape[1] <= limit:
            return batch
        multimodal = self._multimodal_positions(batch)
        beyond = multimodal[:, limit:].any(dim=1)
        if beyond.any():
            row = int(beyond.nonzero()[0, 0])
            length = int(batch["attention_mask"][row].sum()) if "attention_mask" in batch else input_ids.shape[1]
            raise VisionBatchError(
                f"example {parsed[row].index} is {length} tokens long with image tokens beyond "
                f"max_seq_length={limit}; truncating would cut an image. Raise max_seq_length, or shrink the "
                "images (max_image_size= / max_pixels= on the collator)"
            )
        cut = sum(int(batch["attention_mask"][r].sum()) > limit for r in range(input_ids.shape[0])) \
            if "attention_mask" in batch else input_ids.shape[0]
        if cut and not getattr(self, "_warned_truncation", False):
            self._warned_truncation = True
            logger.warning("pronghorn: truncated %d example(s) to max_seq_length=%d (text after their images; "
                           "warned once)", cut, limit)
        batch_size, seq = input_ids.shape
        for key in list(batch.keys()):
            value = batch[key]
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (batch_size, seq) \
                    and (key in _SEQUENCE_KEYS or not key.startswith("pixel")):
                batch[key] = value[:, :limit]
        return batch

    def _multimodal_positions(self, batch) -> torch.Tensor:
        input_ids = batch["input_ids"]
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.multimodal_token_ids:
            mask |= input_ids == token_id
        for key in ("mm_token_type_ids", "token_type_ids"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.shape == input_ids.shape:
                mask |= value != 0
        return mask

    def _labels(self, batch, parsed) -> torch.Tensor:
        input_ids = batch["input_ids"]
        labels = input_ids.clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = self.ignore_index
        labels[self._multimodal_positions(batch)] = self.ignore_index
        if self.train_on_responses_only:
            labels = self._mask_prompts(labels, batch, parsed)
        return labels

    def _mask_prompts(self, labels, batch, parsed):
        from pronghorn.data.responses_only import response_mask

        parts = self.response_parts
        lengths = batch["attention_mask"].sum(dim=1).tolist() if "attention_mask" in batch \
            else [labels.shape[1]] * labels.shape[0]
        empty = []
        for row, length in enumerate(lengths):
            ids = batch["input_ids"][row, :length].tolist()
            mask = response_mask(ids, self._template_tokenizer, list(parts.instruction_parts),
                                 list(parts.response_parts), parts.end_part or False)
            keep = torch.zeros(labels.shape[1], dtype=torch.bool)
            keep[:length] = torch.tensor(mask, dtype=torch.bool)
            labels[row][~keep] = self.ignore_index
            if not (labels[row] != self.ignore_index).any():
                empty.append(row)
        if empty and len(empty) == len(lengths):
            raise VisionBatchError(
                f"no example of this batch (examples {[p.index for p in parsed]}) has an assistant token to train on "
                f"with train_on_responses_only ({parts.describe()}); each example needs an assistant turn that "
                "survives max_seq_length. First example's text starts "
                f"{self.tokenizer.decode(batch['input_ids'][0][:60])!r}"
            )
        for row in empty:
            reason = "has no assistant turn" if not parsed[row].has_assistant_turn else \
                "has no assistant token left (truncated by max_seq_length, or the markers do not match)"
            warnings.warn(f"example {parsed[row].index} {reason}; it adds no loss", stacklevel=3)
        return labels


# --------------------------------------------------------------------------------------------- capabilities


def _image_layout(processor) -> str | None:
    """How this processor takes the images of a batch: "nested" (one list per example, empty for text-only
    examples), "flat" (one list for the batch), or None when it takes no images at all.

    Read from the processor itself: a processor takes images when its call accepts ``images`` and it has an
    image processor; transformers' ``ProcessorMixin`` processors accept (and per-example checks such as
    Gemma 3's and Mllama's need) the nested layout, others get the flat one.
    """
    from transformers import ProcessorMixin

    try:
        accepts_images = callable(processor) and "images" in inspect.signature(processor).parameters
    except (TypeError, ValueError):
        accepts_images = False
    if not accepts_images or getattr(processor, "image_processor", None) is None:
        return None
    return "nested" if isinstance(processor, ProcessorMixin) else "flat"


def _multimodal_token_ids(processor, tokenizer, model) -> set[int]:
    """Ids of every image/video token the processor, its tokenizer or the model config names."""
    ids: set[int] = set()
    vocab_size = len(tokenizer)
    unk = getattr(tokenizer, "unk_token_id", None)

    def add(value):
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size and value != unk:
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    for owner in (processor, tokenizer):
        for name in dir(owner):
            lowered = name.lower()
            if name.startswith("_") or not any(word in lowered for word in _MM_WORDS):
                continue
            try:
                value = getattr(owner, name)
            except (AttributeError, NotImplementedError, ValueError, TypeError):
                continue
            if lowered.endswith(("_token_id", "_token_ids", "_token_index")):
                add(value)
            elif lowered.endswith("_token") and isinstance(value, str) and value:
                token_id = tokenizer.convert_tokens_to_ids(value)
                add(token_id)
    # Special tokens whose text names an image/video marker (Qwen's <|vision_start|>, Gemma's
    # <start_of_image>, Pixtral's [IMG_END], ...): known without the model's config.
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(getattr(added, "content", added)).lower()
        if getattr(added, "special", False) and any(word in content for word in _MM_WORDS):
            add(token_id)
    if model is not None:
        config = getattr(model, "config", None)
        for name in _CONFIG_TOKEN_ATTRS:
            add(getattr(config, name, None))
    special = {getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
               getattr(tokenizer, "bos_token_id", None)}
    return ids - special


def _is_text_only_model(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "vision_config", None) is None and \
        getattr(config, "vision_tower", None) is None and not hasattr(config, "vision_feature_layer")


def _with_processor_template(tokenizer, processor):
    """The tokenizer carrying the processor's chat template (VLM processors keep the template themselves)."""
    template = getattr(processor, "chat_template", None)
    if template is None or getattr(tokenizer, "chat_template", None) == template:
        return tokenizer
    view = copy.copy(tokenizer)
    view.chat_template = template
    return view
