"""Tool calling: normalising OpenAI-style tool-call messages and parsing generated tool calls back."""
from __future__ import annotations

import ast
import json
import re

from pronghorn.data.templates.registry import ChatTemplate, get_template_entry

TOOL_FORMATS = ("hermes", "llama", "mistral", "gemma")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_GEMMA = re.compile(r"```tool_code\s*\n(.*?)(?:\n?```|$)", re.S)


def normalize_messages(messages: list[dict], drop_null_arguments: bool = False) -> list[dict]:
    """A copy of ``messages`` ready for chat templates: tool-call ``arguments`` given as JSON strings
    (OpenAI's wire format) become dicts, and a missing assistant ``content`` becomes ``""``.

    ``drop_null_arguments`` removes arguments whose value is ``None``: a ``datasets`` column stores the
    arguments of different tools as one Arrow struct and fills the keys a call lacks with ``None``.
    """
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        calls = message.get("tool_calls")
        if calls:
            fixed = []
            for call in calls:
                call = dict(call)
                fn = dict(call.get("function", call))
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError as err:
                        raise ValueError(f"message {i}: tool call arguments are not valid JSON: {args!r}") from err
                if drop_null_arguments and isinstance(args, dict):
                    args = {k: v for k, v in args.items() if v is not None}
                fn["arguments"] = args
                call = {k: v for k, v in call.items() if v is not None}  # Arrow fills absent keys (id) with None
                fixed.append({**call, "type": call.get("type") or "function", "function": fn}
                             if "function" in call else {"type": "function", "function": fn})
            message["tool_calls"] = fixed
        elif "tool_calls" in message:
            del message["tool_calls"]  # None/[] would send templates down their tool-call branch
        if message.get("content") is None:
            message["content"] = ""
        out.append(message)
    return out


def _tool_format(template) -> str:
    if isinstance(template, ChatTemplate):
        fmt = template.tool_format
    elif isinstance(template, str) and template in TOOL_FORMATS:
        fmt = template
    elif isinstance(template, str):
        fmt = get_template_entry(template).tool_format
    else:
        from pronghorn.data.chat_templates import template_entry_for

        entry = template_entry_for(template)
        if entry is None:
            raise ValueError("the tokenizer's chat template is not a registered one; pass template='qwen-2.5' "
                             f"or a tool format among {TOOL_FORMATS}")
        fmt = entry.tool_format
    if fmt is None:
        raise ValueError(f"template {getattr(template, 'name', template)!r} has no tool-call format; "
                         f"tool-capable templates use one of {TOOL_FORMATS}")
    return fmt


def _call(name, arguments, raw: str, call_id=None) -> dict:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call without a function name: {raw!r}")
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments must be a JSON object, got {arguments!r} in {raw!r}")
    call = {"name": name, "arguments": arguments}
    if call_id is not None:
        call["id"] = call_id
    return call


def _json_objects(text: str) -> list:
    """Every top-level JSON value starting at a '{' or '[' in ``text``, in order."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    while True:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            return found
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        found.append(value)
        pos = end


def _python_calls(code: str, raw: str) -> list[dict]:
    """Calls written as Python (``f(a=1, b="x")``); JSON spellings true/false/null are accepted."""
    literals = {"true": True, "false": False, "null": None}
    try:
        tree = ast.parse(code.strip(), mode="exec")
    except SyntaxError as err:
        raise ValueError(f"tool call is not a Python function call: {code!r}") from err
    calls = []
    for stmt in tree.body:
        node = stmt.value if isinstance(stmt, ast.Expr) else None
        if not isinstance(node, ast.Call) or node.args:
            raise ValueError(f"tool call must be name(keyword=value, ...): {code!r}")
        name = ast.unparse(node.func)
        args = {}
        for kw in node.keywords:
            if isinstance(kw.value, ast.Name) and kw.value.id in literals:
                args[kw.arg] = literals[kw.value.id]
            else:
                try:
                    args[kw.arg] = ast.literal_eval(kw.value)
                except ValueError as err:
                    raise ValueError(f"tool call argument {kw.arg!r} is not a literal in {code!r}") from err
        calls.append(_call(name, args, raw))
    return calls


def parse_tool_calls(text: str, template="qwen-2.5") -> list[dict]:
    """Tool calls in generated ``text``, as ``[{"name": str, "arguments": dict}, ...]`` (plus ``"id"`` if given).

    Args:
        text: the model's output (special tokens may be left in).
        template: a registered template name (``"qwen-3"``, ``"llama-3.1"``, ``"mistral-v3"``, ``"gemma-3"``),
            a tool format (``"hermes"``, ``"llama"``, ``"mistral"``, ``"gemma"``), a :class:`ChatTemplate`,
            or a tokenizer carrying a registered template.

    Returns an empty list when the text holds no tool call; raises ``ValueError`` on a malformed one.
    """
    fmt = _tool_format(template)
    calls = []
    if fmt == "hermes":
        for body in _HERMES.findall(text):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as err:
                raise ValueError(f"<tool_call> body is not valid JSON: {body!r}") from err
            if not isinstance(obj, dict):
                raise ValueError(f"<tool_call> body must be a JSON object: {body!r}")
            calls.append(_call(obj.get("name"), obj.get("arguments", obj.get("parameters", {})), body))
    elif fmt == "llama":
        body = text.replace("<|python_tag|>", "").replace("<|eom_id|>", "").replace("<|eot_id|>", "").strip()
        if re.match(r"^[A-Za-z_][\w.]*\s*\(", body):
            # A built-in tool: brave_search.call(query="...")
            return [dict(c, name=c["name"].removesuffix(".call")) for c in _python_calls(body, text)]
        for obj in _json_objects(body):
            for item in obj if isinstance(obj, list) else [obj]:
                if isinstance(item, dict) and "name" in item:
                    calls.append(_call(item["name"], item.get("parameters", item.get("arguments", {})), body))
    elif fmt == "mistral":
        for chunk in text.split("[TOOL_CALLS]")[1:]:
            objects = _json_objects(chunk)
            if not objects or not isinstance(objects[0], (list, dict)):
                raise ValueError(f"[TOOL_CALLS] is not followed by a JSON list: {chunk[:200]!r}")
            items = objects[0] if isinstance(objects[0], list) else [objects[0]]
            for item in items:
                if not isinstance(item, dict):
                    raise ValueError(f"tool call entry must be a JSON object: {item!r}")
                calls.append(_call(item.get("name"), item.get("arguments", {}), chunk, item.get("id")))
    else:  # gemma
        for code in _GEMMA.findall(text):
            calls.extend(_python_calls(code, text))
    return calls


def tool_call_message(calls: list[dict], content: str = "") -> dict:
    """An assistant message carrying ``calls`` (as returned by :func:`parse_tool_calls`), OpenAI style."""
    return {"role": "assistant", "content": content, "tool_calls": [
        {"type": "function", **({"id": c["id"]} if "id" in c else {}),
         "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}
