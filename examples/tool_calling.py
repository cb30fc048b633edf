"""Fine-tune a model on a few tool-use conversations, then run a tool loop with it.

    python examples/tool_calling.py                      # the small model embedded in pronghorn
    python examples/tool_calling.py --model_name Qwen/Qwen2.5-0.5B-Instruct --chat_template qwen-2.5 --max_steps 60

The conversations use OpenAI-style tools: the assistant emits ``tool_calls``, a ``tool`` message brings the
result back, and the assistant answers. Training uses responses-only masking, so the model learns its tool
calls and answers while the tool results (which the runtime supplies) carry no loss.
"""
from __future__ import annotations

import argparse
import json
import random

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current temperature of a city in degrees Celsius.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
TEMPERATURES = {"Paris": 18, "Rome": 24, "Oslo": 7, "Cairo": 31, "Lima": 16, "Tokyo": 21}


def run_tool(name: str, arguments: dict) -> str:
    """The tools themselves: plain Python the loop calls when the model asks."""
    if name == "get_weather":
        city = arguments.get("city")
        if city not in TEMPERATURES:
            return json.dumps({"error": f"unknown city {city!r}"})
        return json.dumps({"city": city, "celsius": TEMPERATURES[city]})
    if name == "add":
        return json.dumps({"sum": int(arguments["a"]) + int(arguments["b"])})
    return json.dumps({"error": f"unknown tool {name!r}"})


def _call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def conversations(seed: int = 0) -> list[list[dict]]:
    """A few tool-use conversations (weather, arithmetic) and plain ones that need no tool."""
    rng = random.Random(seed)
    convs = []
    for city, celsius in TEMPERATURES.items():
        convs.append([
            {"role": "user", "content": f"What is the weather in {city}?"},
            _call("get_weather", {"city": city}),
            {"role": "tool", "content": run_tool("get_weather", {"city": city})},
            {"role": "assistant", "content": f"It is {celsius} degrees Celsius in {city}."},
        ])
    for _ in range(6):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        convs.append([
            {"role": "user", "content": f"What is {a} plus {b}?"},
            _call("add", {"a": a, "b": b}),
            {"role": "tool", "content": run_tool("add", {"a": a, "b": b})},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ])
    for question, answer in [("Say hello.", "Hello!"), ("What colour is the sky?", "The sky is blue."),
                             ("Name a fruit.", "An apple.")]:
        convs.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return convs


def generate(model, tokenizer, messages: list[dict], stop_ids: list[int], max_new_tokens: int) -> str:
    import torch

    prompt = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)


def tool_loop(model, tokenizer, template: str, question: str, max_rounds: int = 3, max_new_tokens: int = 96):
    """Ask, execute any tool calls the model makes, feed results back, until it answers in plain text."""
    from pronghorn.data import get_stop_token_ids, parse_tool_calls, tool_call_message

    stop_ids = get_stop_token_ids(tokenizer)
    messages = [{"role": "user", "content": question}]
    print(f"\nuser: {question}")
    for _ in range(max_rounds):
        text = generate(model, tokenizer, messages, stop_ids, max_new_tokens)
        try:
            calls = parse_tool_calls(text, template)
        except ValueError as err:
            print(f"assistant (malformed tool call, {err}): {text!r}")
            return
        if not calls:
            print(f"assistant: {text!r}")
            return
        messages.append(tool_call_message(calls))
        for call in calls:
            result = run_tool(call["name"], call["arguments"])
            print(f"tool call: {call['name']}({call['arguments']}) -> {result}")
            messages.append({"role": "tool", "content": result})
    print("(stopped after the maximum number of tool rounds)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", default=None, help="Hub name or local path; default: pronghorn's embedded model")
    parser.add_argument("--chat_template", default="qwen-2.5",
                        help="a tool-capable template: qwen-2.5, qwen-3, llama-3.1, mistral-v3, mistral-tekken, gemma-3")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--max_seq_length", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--output_dir", default="outputs/tool_calling")
    parser.add_argument("--seed", type=int, default=3407)
    args = parser.parse_args(argv)

    from datasets import Dataset

    from pronghorn import FastLanguageModel, SFTConfig, SFTTrainer
    from pronghorn.data import apply_chat_template, get_chat_template, get_template_entry, train_on_responses_only

    if not get_template_entry(args.chat_template).supports_tools:
        parser.error(f"--chat_template {args.chat_template} has no tool-call format")
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args.model_name,
                                                         max_seq_length=args.max_seq_length)
    get_chat_template(tokenizer, args.chat_template)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=args.seed)

    # Tool schemas go in as JSON text: as nested columns Arrow would merge the schemas of different tools.
    # (Tool-call arguments get merged the same way; apply_chat_template drops the None-filled extras.)
    rows = [{"messages": conv, "tools": json.dumps(TOOLS)} for conv in conversations(args.seed)]
    dataset = apply_chat_template(Dataset.from_list(rows), tokenizer)
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4,
                       learning_rate=args.learning_rate, logging_steps=10, save_strategy="no", report_to=[],
                       max_length=args.max_seq_length, seed=args.seed, dataset_text_field="text"),
    )
    train_on_responses_only(trainer)
    trainer.train()

    if hasattr(FastLanguageModel, "for_inference"):
        FastLanguageModel.for_inference(model)
    model.eval()
    for question in ("What is the weather in Rome?", "What is 12 plus 30?", "Say hello."):
        tool_loop(model, tokenizer, args.chat_template, question)


if __name__ == "__main__":
    main()
