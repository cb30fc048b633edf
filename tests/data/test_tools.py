"""parse_tool_calls reads back what each tool-capable template writes, and rejects malformed calls."""
import pytest

from pronghorn.data import get_chat_template, normalize_messages, parse_tool_calls, tool_call_message
from tests.data.conversations import TOOL_CHAT, WEATHER_TOOL
from tests.factories import byte_bpe_tokenizer

PARIS = [{"name": "get_weather", "arguments": {"city": "Paris"}}]


@pytest.mark.parametrize("name", ["qwen-2.5", "qwen-3", "llama-3.1", "mistral-v3", "mistral-tekken", "gemma-3"])
def test_round_trip_through_each_template(name):
    tok = get_chat_template(byte_bpe_tokenizer(), name, map_eos_token=False)
    call = {"name": "search", "arguments": {"query": "pronghorn speed", "limit": 3, "exact": True, "tags": ["a"]}}
    chat = [{"role": "user", "content": "Find it"}, tool_call_message([call])]
    text = tok.apply_chat_template(chat, tools=[WEATHER_TOOL], tokenize=False)
    prompt = tok.apply_chat_template(chat[:1], tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    generated = text[len(prompt):] if text.startswith(prompt) else text[text.rindex("[/INST]") + 7:]
    assert parse_tool_calls(generated, name) == [call]
    assert parse_tool_calls(generated, tok) == [call]  # a tokenizer carrying the template works too


def test_formats_directly():
    assert parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                            '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>', "hermes") == [
        *PARIS, {"name": "f", "arguments": {}}]
    assert parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', "hermes") == PARIS
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "llama") == PARIS
    assert parse_tool_calls('<|python_tag|>brave_search.call(query="x")<|eom_id|>', "llama-3.1") == [
        {"name": "brave_search", "arguments": {"query": "x"}}]
    assert parse_tool_calls('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123xyz"}]',
                            "mistral") == [dict(PARIS[0], id="abc123xyz")]
    assert parse_tool_calls('```tool_code\nget_weather(city="Paris")\nf(x=1, ok=true, none=null)\n```', "gemma") == [
        *PARIS, {"name": "f", "arguments": {"x": 1, "ok": True, "none": None}}]
    for fmt in ("hermes", "llama", "mistral", "gemma", "qwen-3"):
        assert parse_tool_calls("Just an answer.", fmt) == []


def test_malformed_calls_raise():
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_tool_calls("<tool_call>{name: x}</tool_call>", "hermes")
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_tool_calls("<tool_call>[1]</tool_call>", "hermes")
    with pytest.raises(ValueError, match="without a function name"):
        parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>', "hermes")
    with pytest.raises(ValueError, match="arguments must be a JSON object"):
        parse_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "hermes")
    with pytest.raises(ValueError, match="not followed by a JSON list"):
        parse_tool_calls("[TOOL_CALLS] oops", "mistral")
    with pytest.raises(ValueError, match="name\\(keyword=value"):
        parse_tool_calls("```tool_code\nf(1)\n```", "gemma")
    with pytest.raises(ValueError, match="not a literal"):
        parse_tool_calls("```tool_code\nf(x=y)\n```", "gemma")
    with pytest.raises(ValueError, match="not a Python function call"):
        parse_tool_calls("```tool_code\nf(x=\n```", "gemma")
    with pytest.raises(ValueError, match="no tool-call format"):
        parse_tool_calls("x", "chatml")
    with pytest.raises(ValueError, match="not a registered one"):
        parse_tool_calls("x", byte_bpe_tokenizer())


def test_normalize_messages():
    chat = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"name": "g", "arguments": ""}]}, {"role": "user", "content": "x", "tool_calls": None}]
    out = normalize_messages(chat)
    assert out[0]["content"] == "" and out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[0]["tool_calls"][0]["id"] == "1"
    assert out[0]["tool_calls"][1] == {"type": "function", "function": {"name": "g", "arguments": {}}}
    assert "tool_calls" not in out[1]
    assert chat[0]["content"] is None  # the input is not modified
    with pytest.raises(ValueError, match="not valid JSON"):
        normalize_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}])
    assert normalize_messages(TOOL_CHAT)[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_arrow_merged_arguments_are_dropped_when_rendering_a_dataset():
    from datasets import Dataset

    from pronghorn.data import apply_chat_template

    def call(name, args):
        return [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}]
    ds = Dataset.from_list([{"messages": call("get_weather", {"city": "Paris"})},
                            {"messages": call("add", {"a": 1, "b": 2})}])
    assert ds[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "a": None, "b": None}
    tok = get_chat_template(byte_bpe_tokenizer(), "qwen-2.5")
    texts = apply_chat_template(ds, tok)["text"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in texts[0]
    assert '{"name": "add", "arguments": {"a": 1, "b": 2}}' in texts[1]
