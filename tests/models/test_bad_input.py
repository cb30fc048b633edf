"""Every bad input named by the foundation issue gets an error that says what was wrong and what is right."""
import logging

import pytest
import torch
from datasets import Dataset

from pronghorn import FastLanguageModel, SFTConfig, SFTTrainer
from pronghorn.config.validation import ConfigError
from pronghorn.models.sources import ModelNotFoundError
from pronghorn.quant.bnb import QuantizationUnavailableError
from tests.factories import byte_bpe_tokenizer, save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def test_unknown_local_path():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        FastLanguageModel.from_pretrained("./no/such/model")


def test_unknown_hub_name_offline():
    with pytest.raises(ModelNotFoundError, match="Could not find model 'nobody-xyz/not-a-model'"):
        FastLanguageModel.from_pretrained("nobody-xyz/not-a-model")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_4bit_and_8bit(tiny_dir):
    with pytest.raises(ConfigError, match="choose one"):
        FastLanguageModel.from_pretrained(str(tiny_dir), load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize("length", [0, -5, 1.5])
def test_bad_max_seq_length(tiny_dir, length):
    with pytest.raises(ConfigError, match="max_seq_length must be a positive integer"):
        FastLanguageModel.from_pretrained(str(tiny_dir), max_seq_length=length)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where 4-bit cannot run")
def test_4bit_without_gpu_says_what_to_do(tiny_dir):
    with pytest.raises(QuantizationUnavailableError, match="load_in_4bit=False"):
        FastLanguageModel.from_pretrained(str(tiny_dir), load_in_4bit=True)


@pytest.mark.parametrize("r", [0, -1])
def test_bad_rank(tiny_dir, r):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dir))
    with pytest.raises(ConfigError, match="r \\(the LoRA rank\\) must be a positive integer"):
        FastLanguageModel.get_peft_model(model, r=r)


def test_target_modules_matching_nothing_lists_layers(tiny_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_dir))
    with pytest.raises(ConfigError, match=r"match no layer.*'down_proj'.*'q_proj'"):
        FastLanguageModel.get_peft_model(model, target_modules=["query", "value"])


def test_dataset_without_text_or_messages_lists_columns(tiny_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_dir))
    model = FastLanguageModel.get_peft_model(model, r=4)
    data = Dataset.from_dict({"question": ["a"], "answer": ["b"]})
    with pytest.raises(ValueError, match=r"no 'text' column.*columns found: \['question', 'answer'\]"):
        SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                   args=SFTConfig(output_dir="unused", report_to="none"))


def test_tokenizer_without_pad_token_is_fixed_and_said(tmp_path, caplog):
    save_tiny("llama", tmp_path)
    tok = byte_bpe_tokenizer(pad=None)
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        _, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path))
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    assert "had no pad token" in caplog.text
