"""Tensor type choice, fallbacks, quantizer exactness, and the k-quant dependency error."""
import builtins

import gguf
import numpy as np
import pytest
import torch

from pronghorn.export.gguf.quantize import normalize_methods, quantize_q8_0, tensor_type
from pronghorn.export.gguf.save import save_pretrained_gguf
from tests.export.helpers import lora_model, tokenizer_for

Q = gguf.GGMLQuantizationType


def test_q8_0_matches_ggml_reference_rounding():
    x = torch.randn(48, 256) * 3
    x[0, :32] = 0                                   # all-zero block
    x[1, :32] = torch.arange(32) * 0.5 - 8          # exact .5 ties (rounded away from zero)
    ours = quantize_q8_0(x)
    ref = gguf.quants.quantize(x.numpy(), Q.Q8_0)
    assert ours.dtype == np.uint8 and np.array_equal(ours, ref)


def test_type_choice_and_fallbacks():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q8_0") == Q.F32          # 1-D stays f32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q8_0") == Q.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "q8_0") == Q.F16          # 48 % 32 != 0
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "bf16") == Q.BF16
    assert tensor_type("blk.0.ffn_up.weight", (64, 64), "q4_0") == Q.Q4_0
    assert tensor_type("token_embd.weight", (512, 64), "q4_0") == Q.Q8_0          # embeddings kept at 8 bits


def test_method_names():
    assert normalize_methods("Q8_0") == ["q8_0"]
    assert normalize_methods(["not_quantized", "fast_quantized", "quantized", "f16"]) == ["f16", "q8_0", "q4_k_m"]
    with pytest.raises(ValueError, match="unknown quantization_method"):
        normalize_methods("q9_9")


def test_fallback_type_written_for_odd_rows(tmp_path):
    model = lora_model("llama", intermediate_size=80)      # down_proj rows of 80: not a multiple of 32
    (path,) = save_pretrained_gguf(model, tmp_path / "g", tokenizer_for(model), "q8_0", ollama=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16
    assert types["blk.0.ffn_up.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == Q.F32


def test_k_quant_without_llama_cpp_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    model = lora_model("llama")
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        save_pretrained_gguf(model, tmp_path / "g", tokenizer_for(model), ["q8_0", "q4_k_m"], ollama=False)
    assert list(tmp_path.iterdir()) == []                 # nothing half-written, not even the q8_0 file


def test_gguf_metadata(tmp_path):
    model = lora_model("gemma2")
    tok = tokenizer_for(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (path,) = save_pretrained_gguf(model, tmp_path / "g", tok, "f16", ollama=False)
    fields = gguf.GGUFReader(path).fields

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]
    assert value("general.architecture") == "gemma2"
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.chat_template") == tok.chat_template
    assert value("gemma2.attn_logit_softcapping") == pytest.approx(50.0)
    assert value("gemma2.final_logit_softcapping") == pytest.approx(30.0)
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    # Gemma norms are stored as 1 + w
    reader = gguf.GGUFReader(path)
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    hf = model.get_base_model().model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(norm.data), hf + 1.0, rtol=0, atol=1e-7)
