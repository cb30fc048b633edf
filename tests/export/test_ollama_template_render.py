"""The Modelfile TEMPLATE, executed as Ollama executes it (Go text/template over Ollama's data), builds
exactly the prompt the training chat template (Jinja) renders, for every registered template.

Ollama always renders a prompt for the model to continue, so a conversation ending in a user turn is
compared with the Jinja render with ``add_generation_prompt=True``, and one ending in an assistant turn
(a prefill) with ``continue_final_message=True``. The BOS token is not part of an Ollama prompt: llama.cpp
adds it from the GGUF's ``add_bos_token``, so a Jinja render's leading BOS is left out of the comparison.
"""
import pytest

from pronghorn.data import get_chat_template, get_template_entry, list_chat_templates
from pronghorn.export.ollama import modelfile_text, ollama_pieces_for
from tests.export import ollama_render
from tests.factories import byte_bpe_tokenizer

SYS = "You are terse."
Q1, A1, Q2, A2, Q3 = "What is 2+2?", "4.", "And 3+3?", "6, as\nbefore.", "Why?"

CONVERSATIONS = {
    "user": [{"role": "user", "content": Q1}],
    "system-user": [{"role": "system", "content": SYS}, {"role": "user", "content": Q1}],
    "multi-turn": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                   {"role": "user", "content": Q2}],
    "system-multi-turn": [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
                          {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                          {"role": "assistant", "content": A2}, {"role": "user", "content": Q3}],
}
PREFILL = [{"role": "user", "content": Q1}, {"role": "assistant", "content": "The answer"}]
PREFILL_SYSTEM = [{"role": "system", "content": SYS}, *PREFILL]


def _call(city, **more):
    # Arguments with keys in sorted order: Go ranges over a map sorted, the Jinja side keeps the data's order.
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city, **more}}}


TOOL_CALL = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [_call("Paris", unit="C")]},
             {"role": "tool", "content": "22C"}]
TOOL_CONVERSATIONS = {
    "pending-result": TOOL_CALL,
    "answered": [*TOOL_CALL, {"role": "assistant", "content": "It is 22C."}, {"role": "user", "content": "Thanks"}],
    "two-calls": [{"role": "user", "content": "Paris and Rome?"},
                  {"role": "assistant", "content": "Checking.", "tool_calls": [_call("Paris"), _call("Rome", days=2)]},
                  {"role": "tool", "content": "22C"}, {"role": "tool", "content": "25C"},
                  {"role": "assistant", "content": "Paris 22C, Rome 25C."}, {"role": "user", "content": "Thanks"}],
}
# Tool-call and tool-result turns are checked where the Ollama template reproduces them; Llama 3.1 accepts
# one call per assistant turn. Gemma's and Mistral's Ollama templates do not write tool turns yet.
TOOL_TEMPLATES = {"qwen-2.5": list(TOOL_CONVERSATIONS), "qwen-3": list(TOOL_CONVERSATIONS),
                  "llama-3.1": ["pending-result", "answered"]}


@pytest.fixture(scope="session")
def renderer(tmp_path_factory):
    go = ollama_render.find_go()
    if go is None:
        pytest.skip(f"no Go toolchain to execute Ollama templates with; {ollama_render.GET_GO}")
    return ollama_render.build(go, tmp_path_factory.mktemp("ollama_render"))


def _tokenizer(name):
    # A tokenizer whose EOS differs from every template's own end token, so a template that should write
    # the tokenizer's EOS (alpaca, vicuna, zephyr) cannot pass by writing a hard-coded one.
    return get_chat_template(byte_bpe_tokenizer(eos="<|endoftext|>"), name)


def _jinja(tok, messages, **kwargs) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text


@pytest.mark.parametrize("name", list_chat_templates())
def test_modelfile_template_renders_like_training_template(renderer, name):
    tok = _tokenizer(name)
    template, _, _ = ollama_pieces_for(tok)
    names = list(CONVERSATIONS)
    got = ollama_render.render(renderer, [{"template": template, "messages": CONVERSATIONS[n]} for n in names])
    for conv, text in zip(names, got):
        expected = _jinja(tok, CONVERSATIONS[conv], add_generation_prompt=True)
        assert text == expected, f"{name}: conversation {conv!r} renders differently in Ollama"


@pytest.mark.parametrize("name", list_chat_templates())
def test_modelfile_template_continues_a_prefilled_answer(renderer, name):
    tok = _tokenizer(name)
    template, _, _ = ollama_pieces_for(tok)
    got = ollama_render.render(renderer, [{"template": template, "messages": m} for m in (PREFILL, PREFILL_SYSTEM)])
    for messages, text in zip((PREFILL, PREFILL_SYSTEM), got):
        expected = _jinja(tok, messages, continue_final_message=True)
        assert text == expected, f"{name}: prefill {messages!r} renders differently in Ollama"


@pytest.mark.parametrize("name", sorted(TOOL_TEMPLATES))
def test_modelfile_template_renders_tool_turns_like_training_template(renderer, name):
    tok = _tokenizer(name)
    template, _, _ = ollama_pieces_for(tok)
    convs = TOOL_TEMPLATES[name]
    got = ollama_render.render(renderer, [{"template": template, "messages": TOOL_CONVERSATIONS[c]} for c in convs])
    for conv, text in zip(convs, got):
        expected = _jinja(tok, TOOL_CONVERSATIONS[conv], add_generation_prompt=True)
        assert text == expected, f"{name}: tool conversation {conv!r} renders differently in Ollama"


@pytest.mark.parametrize("name", ["chatml", "llama-3.1", "gemma-2", "mistral-v3", "alpaca"])
def test_modelfile_system_applies_when_the_request_has_none(renderer, name):
    """Ollama puts the Modelfile's SYSTEM in front of a conversation that brings no system message."""
    tok = _tokenizer(name)
    template, _, _ = ollama_pieces_for(tok)
    conv = CONVERSATIONS["multi-turn"]
    (text,) = ollama_render.render(renderer, [{"template": template, "system": SYS, "messages": conv}])
    expected = _jinja(tok, [{"role": "system", "content": SYS}, *conv], add_generation_prompt=True)
    assert text == expected


def test_modelfile_text_round_trips_the_template(renderer):
    """What Ollama reads back from the Modelfile's TEMPLATE \"\"\"...\"\"\" block is the template we rendered."""
    tok = _tokenizer("llama-3.1")
    template, stops, params = ollama_pieces_for(tok)
    text = modelfile_text("model.Q8_0.gguf", template, stops, params)
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    assert text[start:text.index('"""', start)] == template


def test_renderer_follows_ollama_legacy_prompt_templates(renderer):
    """Templates without .Messages run once per turn; the last run stops at {{ .Response }}."""
    template = "{{ if .System }}S:{{ .System }} {{ end }}U:{{ .Prompt }} A:{{ .Response }}|"
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    plain = [{"role": "user", "content": "hi"}]
    got = ollama_render.render(renderer, [{"template": template, "messages": conv},
                                          {"template": "{{ .Prompt }}", "messages": plain}])
    assert got == ["S:s U:a A:b|U:c A:", "hi"]


def test_renderer_reports_template_errors(renderer):
    with pytest.raises(ValueError, match="failed to execute"):
        ollama_render.render(renderer, [{"template": "{{ .Messages.Nope }}",
                                         "messages": [{"role": "user", "content": "x"}]}])


def test_classic_templates_need_the_tokenizers_eos():
    tok = byte_bpe_tokenizer(eos="<|endoftext|>")
    template, _, _ = ollama_pieces_for(get_chat_template(tok, "alpaca"))
    assert "<|endoftext|>" in template
    assert get_template_entry("alpaca").eos_token is None
