"""ShareGPT conversion, to_sharegpt, apply_chat_template, Alpaca formatting and file loading."""
import json

import pytest
from datasets import Dataset

from pronghorn.data import (
    alpaca_prompt, alpaca_to_conversations, apply_chat_template, format_alpaca, get_chat_template, load_dataset_file,
    standardize_sharegpt, to_sharegpt,
)
from tests.data.conversations import TOOL_CHAT, WEATHER_TOOL
from tests.factories import byte_bpe_tokenizer

SHAREGPT = [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]


def test_standardize_sharegpt():
    ds = Dataset.from_list([{"conversations": SHAREGPT}])
    out = standardize_sharegpt(ds)
    assert out[0]["conversations"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Yo"}]
    assert standardize_sharegpt(out)[0]["conversations"] == out[0]["conversations"]  # idempotent
    custom = Dataset.from_list([{"messages": [{"from": "Robot", "value": "x"}]}])
    assert standardize_sharegpt(custom, aliases={"robot": "assistant"})[0]["messages"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="unknown role 'Robot'"):
        standardize_sharegpt(custom)
    with pytest.raises(KeyError, match="no conversation column"):
        standardize_sharegpt(Dataset.from_list([{"text": "x"}]))
    with pytest.raises(KeyError, match="neither 'role' nor 'from'"):
        standardize_sharegpt(Dataset.from_list([{"conversations": [{"speaker": "a", "value": "x"}]}]))


ROWS = [
    {"instruction": "Add", "input": "1 2", "output": "3", "extra": 0},
    {"instruction": "Greet", "input": None, "output": "Hello", "extra": 1},
    {"instruction": "Shout", "input": "  ", "output": "HEY", "extra": 2},
    {"instruction": "Count", "input": float("nan"), "output": "1 2 3", "extra": 3},
]


def test_to_sharegpt_optional_parts_and_missing_values():
    ds = Dataset.from_pandas(__import__("pandas").DataFrame(ROWS))
    out = to_sharegpt(ds, merged_prompt="{instruction}[[\nYour input is:\n{input}]]", output_column_name="output")
    assert out.column_names == ["conversations"]
    assert out[0]["conversations"] == [{"from": "human", "value": "Add\nYour input is:\n1 2"},
                                       {"from": "gpt", "value": "3"}]
    assert [c["conversations"][0]["value"] for c in out][1:] == ["Greet", "Shout", "Count"]
    kept = to_sharegpt(ds, merged_prompt="[[Input: {input}. ]]Do: {instruction}", output_column_name="output",
                       remove_unused_columns=False)
    assert "extra" in kept.column_names and kept[0]["conversations"][0]["value"] == "Input: 1 2. Do: Add"


def test_to_sharegpt_conversation_extension_is_seeded():
    ds = Dataset.from_list([{"q": f"q{i}", "a": f"a{i}"} for i in range(6)])
    a = to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=3)
    b = to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=3)
    c = to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=3, random_state=1)
    assert list(a["conversations"]) == list(b["conversations"]) != list(c["conversations"])
    assert len(a) == 6
    for i, conv in enumerate(a["conversations"]):
        assert len(conv) == 6 and conv[0]["value"] == f"q{i}" and conv[1]["value"] == f"a{i}"
        asked = [t["value"] for t in conv[::2]]
        assert len(set(asked)) == 3  # distinct rows, never the row itself twice
        assert all(t["from"] == ("human" if k % 2 == 0 else "gpt") for k, t in enumerate(conv))
        assert all(conv[k + 1]["value"] == "a" + conv[k]["value"][1:] for k in range(0, 6, 2))


def test_to_sharegpt_errors():
    ds = Dataset.from_list([{"q": "x", "a": "y"}, {"q": None, "a": "z"}])
    with pytest.raises(KeyError, match=r"\['nope'\]"):
        to_sharegpt(ds, merged_prompt="{nope}", output_column_name="a")
    with pytest.raises(KeyError, match="'answer'"):
        to_sharegpt(ds, merged_prompt="{q}", output_column_name="answer")
    with pytest.raises(ValueError, match="row 1: required column 'q' is empty"):
        to_sharegpt(ds, merged_prompt="{q}", output_column_name="a")
    with pytest.raises(ValueError, match="names no column"):
        to_sharegpt(ds, merged_prompt="plain", output_column_name="a")
    for bad in ("{q}[[ {a}", "{q}]] x", "[[ [[{q}]] ]]"):
        with pytest.raises(ValueError, match=r"\[\[|\]\]"):
            to_sharegpt(ds, merged_prompt=bad, output_column_name="a")
    with pytest.raises(ValueError, match="at least that many rows"):
        to_sharegpt(ds.select([0]), merged_prompt="{q}", output_column_name="a", conversation_extension=3)
    with pytest.raises(ValueError, match=">= 1"):
        to_sharegpt(ds, merged_prompt="{q}", output_column_name="a", conversation_extension=0)
    with pytest.raises(ValueError, match="output column 'a' is empty"):
        to_sharegpt(Dataset.from_list([{"q": "x", "a": ""}]), merged_prompt="{q}", output_column_name="a")


def test_pipeline_to_text_with_tools_and_bos_handling():
    tok = byte_bpe_tokenizer()
    ds = Dataset.from_list([{"conversations": SHAREGPT}])
    text = apply_chat_template(standardize_sharegpt(ds), tok, chat_template="chatml")[0]["text"]
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    # Tools per row (as JSON text too), OpenAI-style string arguments and a None content.
    chat = [dict(m) for m in TOOL_CHAT]
    chat[1] = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]}
    rows = Dataset.from_list([{"messages": chat, "tools": json.dumps([WEATHER_TOOL])}])
    out = apply_chat_template(rows, get_chat_template(byte_bpe_tokenizer(), "qwen-2.5"))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in out[0]["text"]
    # A tokenizer that inserts BOS itself: the rendered BOS is stripped so it is not doubled.
    from tokenizers import processors
    bos_tok = byte_bpe_tokenizer(bos="<|begin_of_text|>")
    bos_id = bos_tok.bos_token_id
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)])
    simple = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}]}])
    stripped = apply_chat_template(simple, bos_tok, chat_template="llama-3", system_message="Be brief")[0]["text"]
    assert stripped.startswith("<|start_header_id|>system<|end_header_id|>\n\nBe brief<|eot_id|>")
    kept = apply_chat_template(simple, bos_tok, chat_template="llama-3", strip_bos=False)[0]["text"]
    assert kept.startswith("<|begin_of_text|>")
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(simple, byte_bpe_tokenizer())


def test_alpaca_formatting():
    ds = Dataset.from_list([{k: v for k, v in r.items() if k != "extra"} for r in ROWS[:2]])
    out = format_alpaca(ds, tokenizer=byte_bpe_tokenizer())
    assert out[0]["text"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd\n\n### Input:\n1 2\n\n"
        "### Response:\n3</s>")
    assert out[1]["text"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nGreet\n\n### Response:\nHello</s>")
    assert alpaca_prompt("Greet") == out[1]["text"][: -len("Hello</s>")]
    convs = alpaca_to_conversations(ds)
    assert convs[0]["conversations"][0] == {"role": "user", "content": "Add\n\n1 2"}
    assert convs[1]["conversations"][0] == {"role": "user", "content": "Greet"}
    with pytest.raises(ValueError, match="eos_token"):
        format_alpaca(ds)
    with pytest.raises(KeyError, match="'output'"):
        format_alpaca(ds.remove_columns("output"), eos_token="</s>")
    with pytest.raises(ValueError, match="non-empty instruction"):
        alpaca_prompt("")
    # No input column at all: every row takes the no-input form, in both renderings.
    no_input = ds.remove_columns("input")
    assert format_alpaca(no_input, eos_token="</s>")[0]["text"] == alpaca_prompt("Add") + "3</s>"
    assert alpaca_to_conversations(no_input)[0]["conversations"][0] == {"role": "user", "content": "Add"}
    with pytest.raises(KeyError, match="'instruction'"):
        alpaca_to_conversations(ds.remove_columns("instruction"))


def test_load_dataset_file_every_format(tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"instruction": ["a", "b"], "output": ["x1", "x2"]})
    paths = {"csv": tmp_path / "d.csv", "tsv": tmp_path / "d.tsv", "jsonl": tmp_path / "d.jsonl",
             "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet"}
    frame.to_csv(paths["csv"], index=False)
    frame.to_csv(paths["tsv"], index=False, sep="\t")
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    paths["json"].write_text(json.dumps(frame.to_dict(orient="records")))
    frame.to_parquet(paths["parquet"])
    for kind, path in paths.items():
        ds = load_dataset_file(path, cache_dir=str(tmp_path / "cache"))
        assert list(ds["instruction"]) == ["a", "b"] and list(ds["output"]) == ["x1", "x2"], kind
    out = to_sharegpt(load_dataset_file(paths["jsonl"], cache_dir=str(tmp_path / "cache")),
                      merged_prompt="{instruction}", output_column_name="output")
    assert out[1]["conversations"][1]["value"] == "x2"
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown file type '.xlsx'; supported: .arrow, .csv"):
        load_dataset_file(tmp_path / "d.xlsx")
    with pytest.raises(ValueError, match="no extension"):
        load_dataset_file(tmp_path / "README")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_dataset_file(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="same type"):
        load_dataset_file([paths["csv"], paths["jsonl"]])
    with pytest.raises(ValueError, match="at least one"):
        load_dataset_file([])
