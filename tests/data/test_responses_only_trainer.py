"""train_on_responses_only on a real TRL SFTTrainer: plain, padding-free and packed batches."""
import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from pronghorn.data import get_chat_template, response_labels, train_on_responses_only
from tests.data.conversations import PLAIN_CHAT, SYSTEM_CHAT, TOOL_CHAT, WEATHER_TOOL
from tests.factories import byte_bpe_tokenizer, tiny_model

TOOLS_ROW = {"messages": TOOL_CHAT, "tools": [WEATHER_TOOL]}
ANSWERS = {0: "Hello<|im_end|>Fine<|im_end|>", 1: "Hello<|im_end|>",
           2: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
              "It is 22C.<|im_end|>"}


def _dataset():
    rows = [SYSTEM_CHAT, PLAIN_CHAT[:2], TOOL_CHAT]
    return Dataset.from_list([{"messages": r, "tools": [WEATHER_TOOL] if r is TOOL_CHAT else None} for r in rows])


def _trainer(tmp_path, **cfg):
    tok = get_chat_template(byte_bpe_tokenizer(), "qwen-2.5")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3, report_to=[],
                     use_cpu=True, save_strategy="no", logging_steps=1, dataset_num_proc=None, **cfg)
    return SFTTrainer(model=tiny_model("qwen2"), args=args, train_dataset=_dataset(), processing_class=tok), tok


def _trained_text(tok, ids, labels):
    return tok.decode([t for t, l in zip(ids, labels) if l != -100])


def _which(tok, ids):
    text = tok.decode(ids)
    return 2 if "<tool_call>" in text else 0 if "How?" in text else 1


@pytest.mark.parametrize("cfg", [dict(), dict(padding_free=True, max_length=None)], ids=["padded", "padding_free"])
def test_collated_labels(tmp_path, cfg):
    trainer, tok = _trainer(tmp_path, **cfg)
    train_on_responses_only(trainer)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for row in rows:
        assert row["labels"] == response_labels(row["input_ids"], tok)
        assert _trained_text(tok, row["input_ids"], row["labels"]) == ANSWERS[_which(tok, row["input_ids"])]
    batch = trainer.data_collator(rows)
    if cfg.get("padding_free"):
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
        want = torch.tensor(sum((r["labels"] for r in rows), []))
        want[batch["position_ids"][0] == 0] = -100
        assert torch.equal(batch["labels"][0], want)
    else:
        for i, row in enumerate(rows):
            n = len(row["labels"])
            assert batch["labels"][i, :n].tolist() == row["labels"]
            assert (batch["labels"][i, n:] == -100).all()
    loss = trainer.train().training_loss
    assert loss == loss and loss > 0


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_packing_keeps_masks(tmp_path, strategy):
    max_length = 2048 if strategy == "bfd" else 300
    trainer, tok = _trainer(tmp_path, packing=True, packing_strategy=strategy, max_length=max_length)
    train_on_responses_only(trainer)
    ds = trainer.train_dataset
    assert "seq_lengths" in ds.column_names and "labels" in ds.column_names
    seen = []
    for row in ds:
        offset = 0
        for length in row["seq_lengths"]:
            ids, labels = row["input_ids"][offset:offset + length], row["labels"][offset:offset + length]
            seen.append(_trained_text(tok, ids, labels))
            offset += length
    if strategy == "bfd":
        assert sorted(seen) == sorted(ANSWERS.values())
    else:  # pieces of split conversations: only answer text is trained (a chunk's leading partial turn is not)
        assert all(any(text in answer for answer in ANSWERS.values()) for text in seen)
        assert 0 < "".join(seen).count("<|im_end|>") <= 5
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    assert "position_ids" in batch
    trained = batch["labels"][batch["labels"] != -100]
    assert trained.numel() == sum(sum(l != -100 for l in r["labels"]) for r in ds) - (
        batch["labels"][batch["position_ids"] == 0] != -100).sum()
    assert trainer.train().training_loss > 0


def test_eval_dataset_masked_too(tmp_path):
    trainer, tok = _trainer(tmp_path)
    trainer.eval_dataset = {"a": trainer.train_dataset}
    train_on_responses_only(trainer)
    row = trainer.eval_dataset["a"][1]
    assert _trained_text(tok, row["input_ids"], row["labels"]) == ANSWERS[1]


def test_wrong_parts_raise_with_the_right_ones(tmp_path):
    trainer, _ = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"no trained token in any example.*response_part='<\|start_header_id\|>"):
        train_on_responses_only(trainer, instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
                                response_part="<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_some_truncated_example_warns(tmp_path):
    tok = get_chat_template(byte_bpe_tokenizer(), "qwen-2.5")
    long_user = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    ds = Dataset.from_list([{"messages": PLAIN_CHAT[:2]}, {"messages": long_user}])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     max_length=120)
    trainer = SFTTrainer(model=tiny_model("qwen2"), args=args, train_dataset=ds, processing_class=tok)
    with pytest.warns(UserWarning, match=r"1 of 2 examples .* \(indices 1\)"):
        train_on_responses_only(trainer)


def test_untokenized_dataset_and_label_rebuilding_collator(tmp_path):
    trainer, _ = _trainer(tmp_path)
    good = trainer.train_dataset
    trainer.train_dataset = Dataset.from_list([{"text": "hi"}])
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        train_on_responses_only(trainer)
    from transformers import DataCollatorForLanguageModeling
    trainer.train_dataset = good.select_columns(["input_ids"])
    trainer.data_collator = DataCollatorForLanguageModeling(trainer.processing_class, mlm=False)
    with pytest.raises(RuntimeError, match="cannot batch the masked 'labels'"):
        train_on_responses_only(trainer)

    def rebuilding(examples):  # pads nothing, but throws the labels away and trains on every token
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "labels": ids.clone()}
    trainer.train_dataset = good.select(range(1))
    trainer.data_collator = rebuilding
    with pytest.raises(RuntimeError, match="rebuilds labels"):
        train_on_responses_only(trainer)
