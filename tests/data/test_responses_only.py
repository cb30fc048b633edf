"""Responses-only labels, checked token by token against conversations built from known segments."""
from pathlib import Path

import pytest

from pronghorn.data import get_chat_template, resolve_parts, response_labels, response_mask
from tests.data.conversations import PLAIN_CHAT, SYSTEM_CHAT, TOOL_CHAT, WEATHER_TOOL
from tests.factories import byte_bpe_tokenizer

IM = "<|im_start|>"
H = "<|start_header_id|>{}<|end_header_id|>\n\n"
QWEN_SYS = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


def _oracle(tok, segments):
    """input_ids and expected labels from (text, trained) segments, each tokenized on its own."""
    ids, labels = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def _check(name, messages, segments, bos="<s>", tools=None, **parts):
    tok = get_chat_template(byte_bpe_tokenizer(bos=bos), name)
    rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert "".join(t for t, _ in segments) == rendered
    ids, expected = _oracle(tok, segments)
    assert response_labels(ids, tok, **parts) == expected
    return tok, ids, expected


def test_single_turn_qwen():
    _check("qwen-2.5", PLAIN_CHAT[:2], [(QWEN_SYS + IM + "user\nHi<|im_end|>\n" + IM + "assistant\n", False),
                                        ("Hello<|im_end|>", True), ("\n", False)])


def test_multi_turn_with_system_chatml():
    _check("chatml", SYSTEM_CHAT, [
        (IM + "system\nSYS<|im_end|>\n" + IM + "user\nHi<|im_end|>\n" + IM + "assistant\n", False),
        ("Hello<|im_end|>", True), ("\n" + IM + "user\nHow?<|im_end|>\n" + IM + "assistant\n", False),
        ("Fine<|im_end|>", True), ("\n", False)])


def test_multi_turn_llama31():
    sys = "<|begin_of_text|>" + H.format("system") + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    _check("llama-3.1", SYSTEM_CHAT, [
        (sys + "SYS<|eot_id|>" + H.format("user") + "Hi<|eot_id|>" + H.format("assistant"), False),
        ("Hello<|eot_id|>", True), (H.format("user") + "How?<|eot_id|>" + H.format("assistant"), False),
        ("Fine<|eot_id|>", True)], bos="<|begin_of_text|>")


def test_tool_call_trained_tool_result_not_qwen():
    tools_header = get_chat_template(byte_bpe_tokenizer(), "qwen-2.5").apply_chat_template(
        TOOL_CHAT[:1], tools=[WEATHER_TOOL], tokenize=False)
    _check("qwen-2.5", TOOL_CHAT, [
        (tools_header + IM + "assistant\n", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', True),
        ("\n" + IM + "user\n<tool_response>\n22C\n</tool_response><|im_end|>\n" + IM + "assistant\n", False),
        ("It is 22C.<|im_end|>", True), ("\n", False)], tools=[WEATHER_TOOL])


def test_tool_call_trained_tool_result_not_llama31():
    tok = get_chat_template(byte_bpe_tokenizer(bos="<|begin_of_text|>"), "llama-3.1")
    head = tok.apply_chat_template(TOOL_CHAT[:1], tools=[WEATHER_TOOL], tokenize=False)
    _check("llama-3.1", TOOL_CHAT, [
        (head + H.format("assistant"), False),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', True),
        (H.format("ipython") + '"22C"<|eot_id|>' + H.format("assistant"), False),
        ("It is 22C.<|eot_id|>", True)], bos="<|begin_of_text|>", tools=[WEATHER_TOOL])


def test_tool_turns_mistral_v3():
    tok = get_chat_template(byte_bpe_tokenizer(), "mistral-v3")
    text = tok.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False)
    head = text[:text.index("[/INST]") + len("[/INST]")]
    _check("mistral-v3", TOOL_CHAT, [
        (head, False), ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>', True),
        ('[TOOL_RESULTS] {"content": 22C}[/TOOL_RESULTS]', False), (" It is 22C.</s>", True)],
        tools=[WEATHER_TOOL])
    # The same with explicit lists of openers (the answer after a tool result follows [/TOOL_RESULTS]).
    _check("mistral-v3", TOOL_CHAT, [
        (head, False), ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>', True),
        ('[TOOL_RESULTS] {"content": 22C}[/TOOL_RESULTS]', False), (" It is 22C.</s>", True)],
        tools=[WEATHER_TOOL], instruction_part=["[INST]", "[TOOL_RESULTS]"], response_part=["[/INST]", "[/TOOL_RESULTS]"])


@pytest.mark.parametrize("name,segments,bos", [
    ("gemma-3", [("<bos><start_of_turn>user\nSYS\n\nHi<end_of_turn>\n<start_of_turn>model\n", False),
                 ("Hello<end_of_turn>", True), ("\n<start_of_turn>user\nHow?<end_of_turn>\n<start_of_turn>model\n", False),
                 ("Fine<end_of_turn>", True), ("\n", False)], "<bos>"),
    ("mistral-v1", [("<s>[INST] SYS\n\nHi [/INST]", False), ("Hello</s>", True), ("[INST] How? [/INST]", False),
                    ("Fine</s>", True)], "<s>"),
    ("phi-3", [("<|system|>\nSYS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", False), ("Hello<|end|>", True),
               ("\n<|user|>\nHow?<|end|>\n<|assistant|>\n", False), ("Fine<|end|>", True), ("\n", False)], "<s>"),
    ("alpaca", [("SYS\n\n### Instruction:\nHi\n\n### Response:\n", False), ("Hello</s>", True),
                ("\n\n### Instruction:\nHow?\n\n### Response:\n", False), ("Fine</s>", True), ("\n\n", False)], "<s>"),
    ("vicuna", [("SYS USER: Hi ASSISTANT:", False), (" Hello</s>", True), ("USER: How? ASSISTANT:", False),
                (" Fine</s>", True)], "<s>"),
    ("zephyr", [("<|system|>\nSYS</s>\n<|user|>\nHi</s>\n<|assistant|>\n", False), ("Hello</s>", True),
                ("\n<|user|>\nHow?</s>\n<|assistant|>\n", False), ("Fine</s>", True), ("\n", False)], "<s>"),
])
def test_other_families(name, segments, bos):
    _check(name, SYSTEM_CHAT, segments, bos=bos)


def test_parts_probed_from_unregistered_template_match_registry():
    official = byte_bpe_tokenizer()
    official.chat_template = (Path(__file__).parent / "fixtures" / "qwen3_official.jinja").read_text()
    parts = resolve_parts(official)
    assert parts.response_part == "<|im_start|>assistant\n"
    assert parts.instruction_parts == ("<|im_start|>user",)
    assert parts.end_part == "<|im_end|>" and "probed" in parts.origin
    ours = get_chat_template(byte_bpe_tokenizer(), "qwen-3")
    ids = ours(ours.apply_chat_template(SYSTEM_CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert response_labels(ids, official) == response_labels(ids, ours)


def test_explicit_unsloth_style_parts_and_no_end_part():
    tok = get_chat_template(byte_bpe_tokenizer(), "chatml")
    segments = [(IM + "user\nHi<|im_end|>\n" + IM + "assistant\n", False), ("Hello<|im_end|>", True), ("\n", False),
                (IM + "user\nHow?<|im_end|>\n" + IM + "assistant\n", False), ("Fine<|im_end|>", True), ("\n", False)]
    ids, expected = _oracle(tok, segments)
    assert response_labels(ids, tok, "<|im_start|>user\n", "<|im_start|>assistant\n") == expected
    # Without an end part the response runs until the next user marker, newline included.
    loose_ids, loose_expected = _oracle(tok, [(t, trained or (t == "\n")) for t, trained in segments])
    assert loose_ids == ids
    assert response_labels(ids, tok, "<|im_start|>user\n", "<|im_start|>assistant\n", end_part=False) == loose_expected


def test_marker_split_differently_in_context_is_still_found():
    # "!?" is one token of this vocabulary, so a response marker ending in "!" fuses with an answer starting with
    # "?": searching for the marker's token ids would miss it; the byte search does not.
    tok = byte_bpe_tokenizer()
    ids = tok("User: hi\nBot!?yes</s>", add_special_tokens=False)["input_ids"]
    marker_ids = tok("Bot!", add_special_tokens=False)["input_ids"]
    assert not any(ids[i:i + len(marker_ids)] == marker_ids for i in range(len(ids)))
    kept = [t for t, m in zip(ids, response_mask(ids, tok, "User:", "Bot!", end_part="</s>")) if m]
    # The straddling token carries answer text, so it is trained on.
    assert tok.decode(kept) == "!?yes</s>"


def test_packed_row_masks_each_segment():
    tok = get_chat_template(byte_bpe_tokenizer(), "chatml")
    a = tok(tok.apply_chat_template(PLAIN_CHAT[:2], tokenize=False), add_special_tokens=False)["input_ids"]
    b = tok(tok.apply_chat_template(SYSTEM_CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    packed = response_mask(a + b, tok, seq_lengths=[len(a), len(b)])
    assert packed == response_mask(a, tok) + response_mask(b, tok)
    with pytest.raises(ValueError, match="add up"):
        response_mask(a + b, tok, seq_lengths=[len(a)])


def test_chunk_starting_inside_a_response():
    tok = get_chat_template(byte_bpe_tokenizer(), "chatml")
    ids = tok(tok.apply_chat_template(PLAIN_CHAT[:2], tokenize=False), add_special_tokens=False)["input_ids"]
    cut = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), len(ids) - 3) - 1  # inside "Hello"
    tail = ids[cut:]
    # The leading partial turn could be anyone's (<|im_end|> closes every turn), so it carries no loss.
    assert sum(response_mask(tail, tok)) == 0
    assert sum(response_mask(tail + ids, tok)) == sum(response_mask(ids, tok))


def test_argument_errors():
    tok = get_chat_template(byte_bpe_tokenizer(), "chatml")
    with pytest.raises(ValueError, match="both"):
        response_labels([1, 2], tok, instruction_part="<|im_start|>user\n")
    with pytest.raises(ValueError, match="non-empty"):
        response_labels([1, 2], tok, instruction_part="", response_part="x")
    with pytest.raises(ValueError, match="also an instruction part"):
        response_labels([1, 2], tok, instruction_part="x", response_part="x")
    with pytest.raises(ValueError, match="end_part"):
        response_labels([1, 2], tok, end_part=3)
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        response_labels([1, 99999], tok)
    with pytest.raises(ValueError, match="no chat template"):
        response_labels([1, 2], byte_bpe_tokenizer())
    bad = byte_bpe_tokenizer()
    bad.chat_template = "{{ 'constant' }}"
    with pytest.raises(ValueError, match="does not render"):
        response_labels([1, 2], bad)
