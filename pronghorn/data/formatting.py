"""Rendering datasets to training text: conversations through a chat template, and Alpaca-style records."""
from __future__ import annotations

import json

from pronghorn.data.chat_templates import get_chat_template
from pronghorn.data.sharegpt import _is_missing, find_conversation_column
from pronghorn.data.templates.classic import ALPACA_SYSTEM, ALPACA_SYSTEM_WITH_INPUT
from pronghorn.data.tools import normalize_messages


def _adds_bos(tokenizer) -> bool:
    """Whether encoding text already inserts the BOS (then a rendered BOS would appear twice)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


def apply_chat_template(dataset, tokenizer, chat_template: str | None = None, conversation_column: str | None = None,
                        output_column: str = "text", tools_column: str = "tools", system_message: str | None = None,
                        add_generation_prompt: bool = False, strip_bos: bool | None = None,
                        drop_null_arguments: bool = True, num_proc=None, **template_kwargs):
    """Render every conversation of ``dataset`` with the tokenizer's chat template into ``output_column``.

    Args:
        dataset: a ``datasets.Dataset`` with a conversation column of role/content turns (run
            :func:`standardize_sharegpt` first for from/value turns).
        tokenizer: the tokenizer whose chat template renders the text.
        chat_template: a registered template name to put on the tokenizer first (via :func:`get_chat_template`).
        conversation_column: defaults to ``conversations`` / ``messages``.
        output_column: where the text goes (``"text"``, TRL's default ``dataset_text_field``).
        tools_column: per-row tool schemas (a list or its JSON string), passed to the template as ``tools``.
        system_message: prepended as a system turn to conversations that have none.
        add_generation_prompt: end with the assistant opener (for prompts to generate from).
        strip_bos: drop a leading BOS from the text; default: when the tokenizer adds a BOS itself on encoding,
            so training text does not start with two.
        drop_null_arguments: drop ``None``-valued tool-call arguments, which Arrow adds when one column holds
            calls of tools with different parameters (store a real null as the JSON string ``"null"``).
        template_kwargs: extra template variables (``enable_thinking=False``, ``date_string=...``).
    """
    if chat_template is not None:
        get_chat_template(tokenizer, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass chat_template='llama-3.1' (see "
                         "pronghorn.data.list_chat_templates()) or call get_chat_template first")
    column = find_conversation_column(dataset.column_names, conversation_column)
    if strip_bos is None:
        strip_bos = _adds_bos(tokenizer)
    bos = tokenizer.bos_token if strip_bos else None
    has_tools = tools_column in dataset.column_names

    def render(batch):
        texts = []
        for row, conversation in enumerate(batch[column]):
            messages = normalize_messages(conversation, drop_null_arguments)
            if system_message is not None and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": system_message}, *messages]
            tools = batch[tools_column][row] if has_tools else None
            if isinstance(tools, str):
                tools = json.loads(tools) if tools.strip() else None
            text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **template_kwargs)
            if bos and text.startswith(bos):
                text = text[len(bos):]
            texts.append(text)
        return {output_column: texts}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    return dataset.map(render, batched=True, **kwargs)


def alpaca_prompt(instruction: str, input: str | None = None, output: str | None = None, eos_token: str = "") -> str:
    """One record in the Stanford Alpaca prompt format (the variant with or without an input section)."""
    if _is_missing(instruction):
        raise ValueError("an Alpaca record needs a non-empty instruction")
    if _is_missing(input):
        text = f"{ALPACA_SYSTEM}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    else:
        text = f"{ALPACA_SYSTEM_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    if output is not None:
        text += f"{output}{eos_token}"
    return text


def _alpaca_rows(dataset, instruction_column: str, input_column: str, output_column: str):
    """Check that ``dataset`` has the instruction and output columns, and return a function that turns a
    batch into ``(instruction, input, output)`` triples (input None where the dataset has no input column)."""
    for needed in (instruction_column, output_column):
        if needed not in dataset.column_names:
            raise KeyError(f"column {needed!r} not in the dataset (columns: {dataset.column_names})")
    has_input = input_column in dataset.column_names

    def rows(batch):
        inputs = batch[input_column] if has_input else [None] * len(batch[instruction_column])
        return zip(batch[instruction_column], inputs, batch[output_column])

    return rows


def format_alpaca(dataset, eos_token: str | None = None, tokenizer=None, instruction_column: str = "instruction",
                  input_column: str = "input", output_column: str = "output", text_column: str = "text",
                  num_proc=None):
    """Add ``text_column`` with each instruction/input/output row in the Alpaca prompt format plus the EOS.

    The EOS comes from ``eos_token`` or ``tokenizer.eos_token``; without one the model never learns to stop,
    so one of them is required. A missing ``input_column`` (or an empty input) uses the no-input variant.
    """
    if eos_token is None:
        eos_token = getattr(tokenizer, "eos_token", None)
    if not eos_token:
        raise ValueError("format_alpaca needs eos_token= or tokenizer= so every example ends with the EOS")
    rows = _alpaca_rows(dataset, instruction_column, input_column, output_column)

    def render(batch):
        return {text_column: [alpaca_prompt(i, x, o, eos_token) for i, x, o in rows(batch)]}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    return dataset.map(render, batched=True, **kwargs)


def alpaca_to_conversations(dataset, instruction_column: str = "instruction", input_column: str = "input",
                            output_column: str = "output", column: str = "conversations", num_proc=None):
    """Turn Alpaca rows into role/content conversations (input appended to the instruction after a blank line),
    ready for :func:`apply_chat_template` with any chat template."""
    rows = _alpaca_rows(dataset, instruction_column, input_column, output_column)

    def convert(batch):
        out = []
        for ins, inp, outp in rows(batch):
            prompt = ins if _is_missing(inp) else f"{ins}\n\n{inp}"
            out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": outp}])
        return {column: out}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    return dataset.map(convert, batched=True, **kwargs)
