"""Data preparation: chat templates, ShareGPT/Alpaca formatting, file loading, responses-only masking, tools.

Importing this package only imports modules (``datasets`` is imported lazily where a file is loaded).
"""
from pronghorn.data.chat_templates import (
    get_chat_template,
    get_stop_token_ids,
    set_generation_stop_tokens,
    template_entry_for,
)
from pronghorn.data.files import load_dataset_file
from pronghorn.data.formatting import alpaca_prompt, alpaca_to_conversations, apply_chat_template, format_alpaca
from pronghorn.data.markers import ResponseParts, probe_parts, resolve_parts
from pronghorn.data.responses_only import response_labels, response_mask, train_on_responses_only
from pronghorn.data.sharegpt import standardize_sharegpt, to_sharegpt
from pronghorn.data.templates.registry import (
    ChatTemplate,
    get_template_entry,
    list_chat_templates,
    ollama_template,
    register_chat_template,
    unregister_chat_template,
)
from pronghorn.data.tools import normalize_messages, parse_tool_calls, tool_call_message

__all__ = [
    "ChatTemplate", "ResponseParts",
    "alpaca_prompt", "alpaca_to_conversations", "apply_chat_template", "format_alpaca",
    "get_chat_template", "get_stop_token_ids", "get_template_entry", "list_chat_templates", "load_dataset_file",
    "normalize_messages", "ollama_template", "parse_tool_calls", "probe_parts", "register_chat_template",
    "resolve_parts", "response_labels", "response_mask", "set_generation_stop_tokens", "standardize_sharegpt",
    "template_entry_for", "to_sharegpt", "tool_call_message", "train_on_responses_only",
    "unregister_chat_template",
]
