"""Every registered template renders known conversations exactly as its model family publishes them."""
import pytest

from pronghorn.data import (
    get_chat_template, get_stop_token_ids, get_template_entry, list_chat_templates, ollama_template,
    register_chat_template, set_generation_stop_tokens, template_entry_for, unregister_chat_template,
)
from pronghorn.data.templates.validate import check_go_template
from tests.data.conversations import PLAIN_CHAT, SYSTEM_CHAT, TOOL_CHAT, WEATHER_TOOL, WEATHER_TOOL_JSON
from tests.factories import byte_bpe_tokenizer

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYS = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
L3 = "<|begin_of_text|>"
H = "<|start_header_id|>{}<|end_header_id|>\n\n"
LLAMA31_SYS = H.format("system") + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

# name -> (render of SYSTEM_CHAT, render of PLAIN_CHAT[:1] with the generation prompt, bos, eos)
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\nFine<|im_end|>\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<s>", "</s>"),
    "qwen-2.5": (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\nFine<|im_end|>\n",
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<s>", "</s>"),
    "qwen-3": (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nFine<|im_end|>\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<s>", "</s>"),
    "llama-3": (
        L3 + H.format("system") + "SYS<|eot_id|>" + H.format("user") + "Hi<|eot_id|>" + H.format("assistant")
        + "Hello<|eot_id|>" + H.format("user") + "How?<|eot_id|>" + H.format("assistant") + "Fine<|eot_id|>",
        L3 + H.format("user") + "Hi<|eot_id|>" + H.format("assistant"), L3, "<|end_of_text|>"),
    "llama-3.1": (
        L3 + LLAMA31_SYS + "SYS<|eot_id|>" + H.format("user") + "Hi<|eot_id|>" + H.format("assistant")
        + "Hello<|eot_id|>" + H.format("user") + "How?<|eot_id|>" + H.format("assistant") + "Fine<|eot_id|>",
        L3 + LLAMA31_SYS + "<|eot_id|>" + H.format("user") + "Hi<|eot_id|>" + H.format("assistant"),
        L3, "<|end_of_text|>"),
    "gemma": (
        "<bos><start_of_turn>user\nSYS\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nHow?<end_of_turn>\n<start_of_turn>model\nFine<end_of_turn>\n",
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>", "<eos>"),
    "mistral-v1": (
        "<s>[INST] SYS\n\nHi [/INST]Hello</s>[INST] How? [/INST]Fine</s>", "<s>[INST] Hi [/INST]", "<s>", "</s>"),
    "mistral-v3": (
        "<s>[INST] Hi[/INST] Hello</s>[INST] SYS\n\nHow?[/INST] Fine</s>", "<s>[INST] Hi[/INST]", "<s>", "</s>"),
    "mistral-tekken": (
        "<s>[INST]Hi[/INST]Hello</s>[INST]SYS\n\nHow?[/INST]Fine</s>", "<s>[INST]Hi[/INST]", "<s>", "</s>"),
    "phi-3": (
        "<|system|>\nSYS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nHow?<|end|>\n"
        "<|assistant|>\nFine<|end|>\n", "<|user|>\nHi<|end|>\n<|assistant|>\n", "<s>", "<|endoftext|>"),
    "phi-4": (
        "<|im_start|>system<|im_sep|>SYS<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant"
        "<|im_sep|>Hello<|im_end|><|im_start|>user<|im_sep|>How?<|im_end|><|im_start|>assistant<|im_sep|>"
        "Fine<|im_end|>", "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>",
        "<s>", "<|endoftext|>"),
    "alpaca": (
        "SYS\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Instruction:\nHow?\n\n### Response:\n"
        "Fine</s>\n\n", f"{ALPACA_SYS}\n\n### Instruction:\nHi\n\n### Response:\n", "<s>", "</s>"),
    "vicuna": (
        "SYS USER: Hi ASSISTANT: Hello</s>USER: How? ASSISTANT: Fine</s>", f"{VICUNA_SYS} USER: Hi ASSISTANT:",
        "<s>", "</s>"),
    "zephyr": (
        "<|system|>\nSYS</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nHow?</s>\n<|assistant|>\nFine</s>\n",
        "<|user|>\nHi</s>\n<|assistant|>\n", "<s>", "</s>"),
}
EXPECTED["gemma-2"] = EXPECTED["gemma-3"] = EXPECTED["gemma"]


def _tok(name, map_eos=True):
    _, _, bos, eos = EXPECTED[name]
    tok = byte_bpe_tokenizer(bos=bos, eos=eos)
    return get_chat_template(tok, name, map_eos_token=map_eos)


def test_every_registered_template_is_covered():
    assert set(list_chat_templates()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_exact(name):
    tok = _tok(name)
    full, gen, _, _ = EXPECTED[name]
    assert tok.apply_chat_template(SYSTEM_CHAT, tokenize=False) == full
    assert tok.apply_chat_template(PLAIN_CHAT[:1], tokenize=False, add_generation_prompt=True) == gen
    # The generation prompt is the registry's response part: what responses-only masking looks for.
    assert gen.endswith(get_template_entry(name).response_part)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_eos_and_stop_tokens(name):
    entry = get_template_entry(name)
    tok = _tok(name)
    expected_eos = entry.eos_token or EXPECTED[name][3]
    assert tok.eos_token == expected_eos
    stops = get_stop_token_ids(tok)
    assert stops[0] == tok.eos_token_id
    for token in entry.stop_tokens:
        tid = tok.convert_tokens_to_ids(token)
        if tid != tok.unk_token_id:
            assert tid in stops
    # The assistant's last turn is closed by the end part that responses-only masking trains on.
    rendered = tok.apply_chat_template(SYSTEM_CHAT, tokenize=False)
    assert rendered[rendered.index("Fine") + 4:].startswith(entry.end_part_for(tok.eos_token))
    assert template_entry_for(tok).jinja == entry.jinja  # gemma 1/2/3 share one template


def test_map_eos_false_keeps_eos():
    tok = byte_bpe_tokenizer()
    get_chat_template(tok, "chatml", map_eos_token=False)
    assert tok.eos_token == "</s>"


def test_map_eos_refuses_token_missing_from_vocab():
    tok = byte_bpe_tokenizer()
    entry = register_chat_template("test-missing-eos", "{{ messages[0]['content'] }}", response_part="A:",
                                   instruction_part="U:", eos_token="<|not_in_vocab|>")
    try:
        with pytest.raises(ValueError, match="not a single token"):
            get_chat_template(tok, entry.name)
    finally:
        unregister_chat_template("test-missing-eos")


def test_set_generation_stop_tokens_on_model():
    from tests.factories import tiny_model
    model = tiny_model("qwen2")
    tok = _tok("qwen-2.5")
    ids = set_generation_stop_tokens(model, tok)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == ids


def test_sharegpt_mapping_renders_like_role_content():
    tok = _tok("chatml")
    sharegpt = [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]], "value": m["content"]}
                for m in SYSTEM_CHAT]
    mapped = byte_bpe_tokenizer()
    get_chat_template(mapped, "chatml", mapping={"role": "from", "content": "value", "user": "human",
                                                 "assistant": "gpt"})
    assert mapped.apply_chat_template(sharegpt, tokenize=False) == tok.apply_chat_template(SYSTEM_CHAT, tokenize=False)
    assert template_entry_for(mapped).name == "chatml"


def test_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match="mapping keys"):
        get_chat_template(byte_bpe_tokenizer(), "chatml", mapping={"speaker": "from"})


def test_aliases_and_unknown_names():
    assert get_template_entry("Qwen2.5").name == "qwen-2.5"
    assert get_template_entry("llama3.2").name == "llama-3.1"
    assert "qwen2.5" in list_chat_templates(include_aliases=True)
    with pytest.raises(KeyError, match="registered templates: alpaca"):
        get_template_entry("no-such-template")
    with pytest.raises(TypeError):
        get_template_entry(3)
    with pytest.raises(TypeError, match="registered name"):
        get_chat_template(byte_bpe_tokenizer(), 42)


def test_register_custom_template_and_errors():
    jinja = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    entry = register_chat_template("test-plain", jinja, response_part="assistant: ", instruction_part="user: ",
                                   eos_token="</s>", ollama_template="{{ .Prompt }}")
    try:
        assert "test-plain" in list_chat_templates()
        tok = get_chat_template(byte_bpe_tokenizer(), "test-plain")
        assert tok.apply_chat_template(PLAIN_CHAT[:2], tokenize=False) == "user: Hi\nassistant: Hello\n"
        assert entry.stop_tokens == ("</s>",) and entry.end_part == "</s>"
        assert ollama_template("test-plain") == ("{{ .Prompt }}", ["</s>"], {})
        with pytest.raises(ValueError, match="already registered"):
            register_chat_template("test-plain", jinja, response_part="a", instruction_part="u")
        with pytest.raises(ValueError, match="already registered"):
            register_chat_template("chatml", jinja, response_part="a", instruction_part="u")
    finally:
        unregister_chat_template("test-plain")
    assert "test-plain" not in list_chat_templates()
    with pytest.raises(ValueError, match="not valid Jinja"):
        register_chat_template("bad", "{% for x in %}", response_part="a", instruction_part="u")
    with pytest.raises(ValueError, match="non-empty"):
        register_chat_template("bad", jinja, response_part="", instruction_part="u")
    with pytest.raises(ValueError, match="tool_format"):
        register_chat_template("bad", jinja, response_part="a", instruction_part="u", tool_format="xml")
    with pytest.raises(KeyError):
        unregister_chat_template("chatml")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ollama_pieces(name):
    template, stops, params = ollama_template(name)
    check_go_template(template, name)
    entry = get_template_entry(name)
    assert stops == list(entry.stop_tokens) and stops
    assert 0.0 <= params["temperature"] <= 2.0
    # The Modelfile template opens assistant turns with the same text the training template does.
    assert entry.response_part.strip() in template


def test_go_template_checker_catches_unbalanced_blocks():
    with pytest.raises(ValueError, match="open"):
        check_go_template("{{ if .System }}x", "t")
    with pytest.raises(ValueError, match="unmatched"):
        check_go_template("x{{ end }}", "t")


TOOL_EXPECTED = {
    "qwen-2.5": (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}\n\n# Tools\n\nYou may call one or more functions to assist with "
        "the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + WEATHER_TOOL_JSON + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 22C.<|im_end|>\n"),
    "mistral-v3": (
        "<s>[AVAILABLE_TOOLS] [" + WEATHER_TOOL_JSON + "][/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST]"
        "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]</s>"
        "[TOOL_RESULTS] {\"content\": 22C}[/TOOL_RESULTS] It is 22C.</s>"),
    "mistral-tekken": (
        "<s>[AVAILABLE_TOOLS][" + WEATHER_TOOL_JSON + "][/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]"
        "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]</s>"
        "[TOOL_RESULTS]{\"content\": 22C}[/TOOL_RESULTS]It is 22C.</s>"),
    "gemma-3": (
        "<bos><start_of_turn>user\nYou have access to the following functions. To call one, reply with a Python "
        "function call inside a ```tool_code``` block, for example:\n```tool_code\nfunction_name(argument=value)\n```"
        "\n\nAvailable functions:\n" + WEATHER_TOOL_JSON + "\n\nWeather in Paris?<end_of_turn>\n<start_of_turn>model\n"
        "```tool_code\nget_weather(city=\"Paris\")\n```<end_of_turn>\n<start_of_turn>user\n```tool_output\n22C\n```"
        "<end_of_turn>\n<start_of_turn>model\nIt is 22C.<end_of_turn>\n"),
}


@pytest.mark.parametrize("name", sorted(TOOL_EXPECTED))
def test_tool_conversations_render(name):
    tok = _tok(name)
    assert tok.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False) == TOOL_EXPECTED[name]


def test_llama31_tool_conversation():
    tok = _tok("llama-3.1")
    text = tok.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False)
    assert text.startswith(L3 + H.format("system") + "Environment: ipython\nCutting Knowledge Date")
    assert (H.format("assistant") + '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
            + H.format("ipython") + '"22C"<|eot_id|>' + H.format("assistant") + "It is 22C.<|eot_id|>") in text
    assert "Given the following functions" in text and '    "name": "get_weather"' in text
    with pytest.raises(Exception, match="one tool call"):
        two = [TOOL_CHAT[0], {"role": "assistant", "content": "", "tool_calls": TOOL_CHAT[1]["tool_calls"] * 2}]
        tok.apply_chat_template(two, tools=[WEATHER_TOOL], tokenize=False)


def test_qwen3_thinking():
    tok = _tok("qwen-3")
    chat = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nold\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>\nnew\n</think>\n\nA2"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nnew\n</think>\n\nA2<|im_end|>\n")
    no_think = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_mistral_rejects_unknown_role():
    tok = _tok("mistral-v1")
    with pytest.raises(Exception, match="roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
