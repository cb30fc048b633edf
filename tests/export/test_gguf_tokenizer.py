"""GGUF vocabularies encode like the HF tokenizer: SentencePiece (.model and tokenizer.json-only) and BPE."""
import shutil

import pytest
import torch

from pronghorn.export.gguf.save import save_pretrained_gguf
from pronghorn.export.gguf.tokenizer import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    pre_tokenizer_name,
)
from tests.export.helpers import lora_model
from tests.factories import CORPUS

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python)")
spm = pytest.importorskip("sentencepiece", reason="pip install sentencepiece")

# No text starts with a space, and no text follows a special token: there HF's Metaspace adds no "▁"
# while llama.cpp (like SentencePiece's legacy behaviour) does -- a runtime difference of the two
# tokenizer implementations for every SentencePiece GGUF, not something the file can change.
TEXTS = CORPUS + ["Hello world, the quick fox", "two  spaces\n\n  indented", "naïve café ÜBER 42", "a turn ends here<|im_end|>", "🙂 emoji"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(d / "sp"), vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    shutil.copy(d / "sp.model", d / "tokenizer.model")
    return d


def _gguf_vocab_only(tmp_path, tok, family):
    model = lora_model(family, vocab_size=len(tok))
    (path,) = save_pretrained_gguf(model, tmp_path / "g", tok, "f16", ollama=False)
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("cls_name,family", [("LlamaTokenizer", "llama"), ("GemmaTokenizer", "gemma")])
def test_sentencepiece_model_file(tmp_path, spm_dir, cls_name, family):
    import transformers

    tok = getattr(transformers, cls_name).from_pretrained(spm_dir)
    llm = _gguf_vocab_only(tmp_path, tok, family)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)[
            "input_ids"], text


def test_sentencepiece_from_tokenizer_json_only(tmp_path, spm_dir):
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    saved = tmp_path / "tok"
    LlamaTokenizer.from_pretrained(spm_dir).save_pretrained(saved)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(saved / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    assert getattr(tok, "vocab_file", None) is None   # scores must come from the merges
    llm = _gguf_vocab_only(tmp_path, tok, "llama")
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)[
            "input_ids"], text


def test_pre_tokenizer_names():
    def split(p):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": False}]}}
    assert pre_tokenizer_name(split(LLAMA3_PATTERN)) == "llama-bpe"
    assert pre_tokenizer_name(split(QWEN2_PATTERN)) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer_name(split(GPT2_PATTERN)) == "gpt-2"
    with pytest.raises(NotImplementedError, match="pre-tokenizer"):
        pre_tokenizer_name(split(r"\w+|\s+"))


def test_tokenizer_bigger_than_model_is_rejected(tmp_path):
    from tests.factories import byte_bpe_tokenizer

    tok = byte_bpe_tokenizer()
    model = lora_model("llama", vocab_size=256)
    with pytest.raises(ValueError, match="resize"):
        save_pretrained_gguf(model, tmp_path / "g", tok, "f16", ollama=False)
    assert not (tmp_path / "g").exists()
    assert torch.is_tensor(next(model.parameters()))
