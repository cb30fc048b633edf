"""Chat-style generation with a fine-tuned model."""
from __future__ import annotations

import torch

from pronghorn.models.modes import for_inference


def chat_reply(model, tokenizer, messages: list[dict] | str, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0) -> str:
    """Generate the assistant's reply to ``messages`` (or a single user string); greedy when temperature is 0."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "\n".join(m["content"] for m in messages) + "\n"
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    was_training = model.training
    for_inference(model)
    sample = temperature > 0
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
            top_p=top_p if sample else None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    if was_training:
        from pronghorn.models.modes import for_training

        for_training(model)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
