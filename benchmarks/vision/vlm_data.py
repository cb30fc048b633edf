"""The vision-language benchmark's workload: seeded chat examples with images of real-looking sizes.

Every configuration's process calls :func:`make_batches` with the same arguments and gets the same
examples (same pixels, sizes and text), which it then collates with its own framework's collator.

Rows cycle through four kinds, so every batch of four holds each once: one image, two images, one image,
text only (one row in four has no image). Images are random RGB pixels, each side drawn uniformly from
``[min_side, max_side]`` (so aspect ratios vary between about 1:2.3 and 2.3:1 for 448..1024 px). The user
asks a short question about the image(s); the assistant answers in 20-60 words.

Imports numpy and (when images are made) PIL only: no transformers, Unsloth must be imported first in its process.
"""
from __future__ import annotations

import numpy as np

# Images per row, cycling: 1, 2, 1, 0 (text-only).
ROW_IMAGE_COUNTS = (1, 2, 1, 0)

_QUESTIONS_IMAGE = [
    "Describe this image in detail.", "What is written on the sign in the picture?",
    "Read the chart and tell me the highest value.", "How many objects are on the table?",
    "What colour is the car on the left?", "Summarise the document shown here.",
]
_QUESTIONS_TWO_IMAGES = [
    "Compare the two images and list the differences.", "Which of these two pictures was taken at night?",
    "Do both images show the same building?",
]
_QUESTIONS_TEXT = [
    "Write a short poem about the sea.", "Explain how a bicycle gear works.",
    "Give me three tips for a job interview.", "What is the capital of France and why is it famous?",
]
_WORDS = ["the", "image", "shows", "a", "street", "with", "cars", "trees", "and", "people", "walking", "under", "a", "bright", "sky", "while", "a", "small", "dog", "waits", "near", "the", "door", "of", "a", "shop", "whose", "sign", "says", "open", "from", "nine", "to", "five", "the", "chart", "has", "five", "bars", "and", "march", "is", "highest", "with", "forty", "two", "units", "sold", "the", "table", "holds", "three", "cups", "two", "plates", "and", "a", "green", "bottle", "light", "falls", "from", "the", "left", "so", "shadows", "point", "right", "and", "the", "colours", "are", "warm"]


def random_image(rng: np.random.Generator, min_side: int, max_side: int):
    """A PIL RGB image of random pixels, each side uniform in ``[min_side, max_side]``."""
    # Imported here, so the suite can name a missing Pillow before anything runs.
    from PIL import Image

    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _answer(rng: np.random.Generator) -> str:
    n = int(rng.integers(20, 61))
    words = [str(w) for w in rng.choice(_WORDS, size=n)]
    return " ".join(words).capitalize() + "."


def make_example(rng: np.random.Generator, n_images: int, min_side: int, max_side: int) -> dict:
    """One conversation: a user turn with ``n_images`` image parts (each carrying its PIL image) and a
    question, then the assistant's answer. Contents are lists of parts, as every collator accepts."""
    if n_images == 0:
        question = str(rng.choice(_QUESTIONS_TEXT))
    elif n_images == 1:
        question = str(rng.choice(_QUESTIONS_IMAGE))
    else:
        question = str(rng.choice(_QUESTIONS_TWO_IMAGES))
    user = [{"type": "image", "image": random_image(rng, min_side, max_side)} for _ in range(n_images)]
    user.append({"type": "text", "text": question})
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": _answer(rng)}]}]}


def make_batches(n_batches: int, batch_size: int, min_side: int, max_side: int, seed: int = 1234) -> list[list[dict]]:
    """``n_batches`` lists of ``batch_size`` examples, identical for identical arguments."""
    rng = np.random.default_rng(seed)
    batches, row = [], 0
    for _ in range(n_batches):
        batch = []
        for _ in range(batch_size):
            batch.append(make_example(rng, ROW_IMAGE_COUNTS[row % len(ROW_IMAGE_COUNTS)], min_side, max_side))
            row += 1
        batches.append(batch)
    return batches


def example_images(example: dict) -> list:
    """The PIL images of an example, in the order their parts appear."""
    return [part["image"] for message in example["messages"] for part in message["content"]
            if isinstance(part, dict) and part.get("type") == "image"]
