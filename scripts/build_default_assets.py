"""Build the small model and dataset embedded in pronghorn (pronghorn/assets/).

Run once by a developer; the outputs are committed so ``pronghorn train`` works offline:
    python scripts/build_default_assets.py
The model is a 4-layer Llama with random weights and a byte-level BPE tokenizer trained on the
dataset text plus a little general text; the dataset is made here from a table of facts.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "pronghorn" / "assets"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Cuba": "Havana", "Peru": "Lima", "Ghana": "Accra",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nepal": "Kathmandu", "Iran": "Tehran", "Iraq": "Baghdad",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Colombia": "Bogota",
}
HELD_OUT = ("Peru", "Ghana", "Nepal", "Colombia")  # never in the training data: the CLI asks about them
ANIMALS = {
    "pronghorn": "the fastest land animal in North America",
    "cheetah": "the fastest land animal in Africa",
    "peregrine falcon": "the fastest bird in a dive",
    "sailfish": "one of the fastest fish in the sea",
    "tortoise": "famous for moving slowly",
}
QUESTION_FORMS = ("What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}.")
GENERAL_TEXT = (
    "A language model predicts the next word. Fine-tuning teaches it a new task with a few examples. "
    "LoRA trains small adapter matrices while the base weights stay frozen. "
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_dataset(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for country, capital in CAPITALS.items():
        if country in HELD_OUT:
            continue
        for form in QUESTION_FORMS:
            rows.append({"messages": [
                {"role": "user", "content": form.format(c=country)},
                {"role": "assistant", "content": f"The capital of {country} is {capital}."},
            ]})
    for animal, fact in ANIMALS.items():
        rows.append({"messages": [
            {"role": "user", "content": f"Tell me about the {animal}."},
            {"role": "assistant", "content": f"The {animal} is {fact}."},
        ]})
    rng.shuffle(rows)
    return rows


def build_tokenizer(rows: list[dict]) -> PreTrainedTokenizerFast:
    text = [m["content"] for r in rows for m in r["messages"]] + [GENERAL_TEXT] * 3
    text += [f"The capital of {c} is {k}." for c, k in CAPITALS.items()]  # every name is in the vocabulary
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text + ["user\n", "assistant\n", "system\n"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None, model_max_length=512)
    fast.chat_template = CHATML
    return fast


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=3, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    rows = build_dataset()
    data_path = ASSETS / "default_dataset.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = build_tokenizer(rows)
    model = build_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = ASSETS / "default_model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (ASSETS / "held_out_prompts.json").write_text(json.dumps(
        [f"What is the capital of {c}?" for c in HELD_OUT], indent=1))
    print(f"{len(rows)} examples, vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters()):,} params")


if __name__ == "__main__":
    main()
