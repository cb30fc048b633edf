"""``pronghorn chat``: answer prompts with a trained model, or talk to it interactively."""
from __future__ import annotations

import sys


def chat_command(args) -> int:
    from pronghorn.inference.generate import chat_reply
    from pronghorn.models.fast_language_model import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.model, fast_paths=False)
    FastLanguageModel.for_inference(model)
    if args.prompt:
        for prompt in args.prompt:
            print(f"> {prompt}\n{chat_reply(model, tokenizer, prompt, args.max_new_tokens, args.temperature)}")
        return 0
    history: list[dict] = []
    print("Type a message (empty line or Ctrl-D to quit).")
    for line in sys.stdin:
        text = line.strip()
        if not text:
            break
        history.append({"role": "user", "content": text})
        reply = chat_reply(model, tokenizer, history, args.max_new_tokens, args.temperature)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0
