"""GGUF files are loaded by llama.cpp itself (llama-cpp-python) and reproduce the HF model.

Tolerances (logits of a tiny fitted fp32 model, |logit| up to ~13):
  f16  -- max |diff| <= 0.03 (f16 weight rounding; llama.cpp also rounds activations for f16 matmuls)
  bf16 -- max |diff| <= 0.25 (bf16 keeps 8 mantissa bits)
  q8_0 -- top-1 agreement >= 99% over the fixed prompts (weights and activations are 8-bit in llama.cpp)
f16 greedy generations must be token-for-token identical.
"""
import numpy as np
import pytest
import torch

from pronghorn.export.gguf.save import save_pretrained_gguf
from tests.export.helpers import trained_lora_model
from tests.factories import CORPUS, FAST_FAMILIES, byte_bpe_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python)")

PROMPTS = CORPUS + ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
F16_ATOL, BF16_ATOL, Q8_TOP1 = 0.03, 0.25, 0.99


def _load(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)


def _gguf_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module", params=FAST_FAMILIES)
def exported(request, tmp_path_factory):
    tok = byte_bpe_tokenizer()
    model = trained_lora_model(request.param, tok)
    out = tmp_path_factory.mktemp(f"gguf-{request.param}")
    paths = save_pretrained_gguf(model, out / "gguf", tok, ["f16", "bf16", "q8_0"], ollama=False)
    return request.param, model, tok, {p.name.split(".")[1].lower(): p for p in paths}


def test_f16_and_bf16_logits_match(exported):
    family, model, tok, paths = exported
    for method, atol in (("f16", F16_ATOL), ("bf16", BF16_ATOL)):
        llm = _load(paths[method])
        for text in PROMPTS:
            ids = tok(text)["input_ids"]
            diff = np.abs(_gguf_logits(llm, ids) - _hf_logits(model, ids)).max()
            assert diff <= atol, f"{family} {method}: max |logit diff| {diff:.4f} > {atol} on {text!r}"
        llm.close()


def test_q8_0_top1_agreement(exported):
    family, model, tok, paths = exported
    llm = _load(paths["q8_0"])
    agree = []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        agree += list(_gguf_logits(llm, ids).argmax(-1) == _hf_logits(model, ids).argmax(-1))
    llm.close()
    assert np.mean(agree) >= Q8_TOP1, f"{family} q8_0 top-1 agreement {np.mean(agree):.3f} over {len(agree)} positions"


def test_f16_greedy_generation_identical(exported):
    family, model, tok, paths = exported
    llm = _load(paths["f16"])
    for text in ("The quick brown", "What is the capital of", "def add(a, b):"):
        ids = tok(text)["input_ids"]
        hf_ids, gg_ids = list(ids), list(ids)
        llm.reset()
        llm.eval(gg_ids)
        for _ in range(12):
            hf_ids.append(int(_hf_logits(model, hf_ids)[-1].argmax()))
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            gg_ids.append(nxt)
            llm.eval([nxt])
        assert gg_ids == hf_ids, f"{family}: greedy text differs:\n{tok.decode(hf_ids)!r}\n{tok.decode(gg_ids)!r}"
    llm.close()


def test_gguf_tokenizer_matches_hf(exported):
    family, _model, tok, paths = exported
    llm = llama_cpp.Llama(model_path=str(paths["q8_0"]), vocab_only=True, verbose=False)
    texts = PROMPTS + ["  leading spaces and\ttabs\n\nnewlines", "naïve café 1234567 ÜBER", "</s><s>[INST] hi [/INST]"]
    for text in texts:
        hf = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf, (family, text)


def test_k_quant_through_llama_cpp(tmp_path):
    tok = byte_bpe_tokenizer()
    model = trained_lora_model("llama", tok)
    (path,) = save_pretrained_gguf(model, tmp_path / "kq", tok, "q4_k_m", ollama=False)
    assert path.name == "model.Q4_K_M.gguf"
    assert sorted(p.name for p in (tmp_path / "kq").iterdir()) == ["README.md", "model.Q4_K_M.gguf"]
    import gguf

    reader = gguf.GGUFReader(path)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    llm = _load(path)
    ids = tok(CORPUS[2])["input_ids"]
    got, ref = _gguf_logits(llm, ids), _hf_logits(model, ids)
    llm.close()
    # 4-bit weights on 64-wide rows (llama.cpp falls back from k-quants there): a loose sanity bound
    assert np.isfinite(got).all() and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
])
def test_rope_scaling_matches(tmp_path, rope):
    tok = byte_bpe_tokenizer()
    model = trained_lora_model("llama", tok, rope_parameters=rope)
    (path,) = save_pretrained_gguf(model, tmp_path / "g", tok, "f16", ollama=False)
    llm = _load(path)
    for text in PROMPTS[:3]:
        ids = tok(text)["input_ids"]
        diff = np.abs(_gguf_logits(llm, ids) - _hf_logits(model, ids)).max()
        assert diff <= F16_ATOL, f"{rope['rope_type']}: max |logit diff| {diff:.4f}"
    llm.close()
