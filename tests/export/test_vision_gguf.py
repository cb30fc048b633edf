"""Vision-language GGUF export: the text GGUF and the mmproj file load in llama.cpp (llama-cpp-python's
libmtmd) and reproduce the Hugging Face model.

llama.cpp supports all three exported families: Qwen2-VL, Qwen2.5-VL (window attention exercised: the
224x112 test image spans two 112-pixel windows) and Gemma 3.

Tolerances, on projected image embeddings (|value| up to 0.3 for Qwen-VL, 1.6 for Gemma 3) of tiny fp32
models with LoRA merged (measured: f32 5e-5 / 1.1e-3, f16 9e-5 / 1.2e-3, q8_0 1.7e-3 / 1.3e-2):
  f32 mmproj  -- max |diff| <= 5e-4 for Qwen-VL; 5e-3 for Gemma 3 (ggml's CPU GELU reads an fp16 table)
  f16 mmproj  -- twice that (f16 weights; ggml also rounds activations for f16 matmuls)
  q8_0 mmproj -- max |diff| <= 5e-2 (8-bit weights and activations)
Text GGUF in f16: logits of a text-only prompt and the last-position logits of an image+text prompt run
through libmtmd (image embeddings placed by llama.cpp, M-RoPE positions for Qwen-VL) within 3e-2 of the
HF model's.
"""
import ctypes
import json

import numpy as np
import pytest
import torch

from pronghorn.export.gguf.save import save_pretrained_gguf
from tests.export.vision_models import (
    VLM_FAMILIES,
    hf_image_features,
    image_inputs,
    image_size_for,
    lora_vlm,
    sample_image,
    tiny_processor,
)

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python)")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp", reason="this llama-cpp-python has no libmtmd bindings")

F32_ATOL = {"qwen2_vl": 5e-4, "qwen2_5_vl": 5e-4, "gemma3": 5e-3}
F16_ATOL = {family: 2 * atol for family, atol in F32_ATOL.items()}
Q8_ATOL = 5e-2
TEXT_ATOL = 3e-2
# The chat template's image placeholder, which libmtmd's media marker stands in for (libmtmd adds the same
# begin/end tokens around the image). Gemma 3's processor also puts a blank line before and after an image,
# which libmtmd leaves to the prompt.
PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>"}
AROUND_IMAGE = {"qwen2_vl": "", "qwen2_5_vl": "", "gemma3": "\n\n"}


class Mtmd:
    """A text GGUF loaded by llama.cpp with its mmproj file attached through libmtmd."""

    def __init__(self, text_path, mmproj_path):
        self.llm = llama_cpp.Llama(model_path=str(text_path), n_ctx=256, n_batch=256, logits_all=False,
                                   verbose=False, n_threads=2)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.llm._model.model, params)
        assert self.ctx, f"libmtmd refused {mmproj_path}"
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm._model.model)

    def tokenize(self, prompt: str, image):
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        self._keep = pixels
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height,
                                       pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        text = prompt.encode()
        inp = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=False, parse_special=True)
        rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        mtmd.mtmd_bitmap_free(bitmap)
        assert rc == 0, f"mtmd_tokenize returned {rc}"
        return chunks

    def chunks(self, chunks):
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            yield mtmd.mtmd_input_chunks_get(chunks, i)

    def image_embeddings(self, image) -> np.ndarray:
        chunks = self.tokenize(mtmd.mtmd_default_marker().decode(), image)
        try:
            for chunk in self.chunks(chunks):
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    assert mtmd.mtmd_encode_chunk(self.ctx, chunk) == 0
                    out = mtmd.mtmd_get_output_embd(self.ctx)
                    return np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        raise AssertionError("libmtmd produced no image chunk")

    def text_ids(self, chunks) -> list[int]:
        ids = []
        for chunk in self.chunks(chunks):
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids += [ptr[i] for i in range(n.value)]
            else:
                ids.append(-1)   # where the image goes
        return ids

    def last_logits(self, chunks) -> np.ndarray:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm._ctx.ctx), True)
        new_n_past = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(self.ctx, self.llm._ctx.ctx, chunks, 0, 0, 256, True,
                                          ctypes.byref(new_n_past))
        assert rc == 0, f"mtmd_helper_eval_chunks returned {rc}"
        logits = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).copy()

    def close(self):
        mtmd.mtmd_free(self.ctx)
        self.llm.close()


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def exported(request, tmp_path_factory):
    family = request.param
    model, processor = lora_vlm(family), tiny_processor(family)
    root = tmp_path_factory.mktemp(f"vgguf-{family}")
    exact = save_pretrained_gguf(model, root / "f32", processor, ["f16", "q8_0"], mmproj_quantization="f32")
    (f16_mmproj,) = [p for p in save_pretrained_gguf(model, root / "f16", processor, "f16", ollama=False)
                     if p.name.startswith("mmproj")]
    (q8_mmproj,) = [p for p in save_pretrained_gguf(model, root / "q8", processor, "q8_0", ollama=False,
                                                    mmproj_quantization="q8_0") if p.name.startswith("mmproj")]
    files = {"f16": exact[0], "q8_0": exact[1], "mmproj_f32": exact[2], "mmproj_f16": f16_mmproj,
             "mmproj_q8_0": q8_mmproj}
    return family, model, processor, files


def test_files_and_metadata(exported):
    import gguf

    family, _model, processor, files = exported
    directory = files["f16"].parent
    assert sorted(p.name for p in directory.iterdir()) == [
        "Modelfile", "README.md", "mmproj-model.F32.gguf", "model.F16.gguf", "model.Q8_0.gguf"]
    text = gguf.GGUFReader(files["f16"])
    arch = bytes(text.fields["general.architecture"].parts[-1]).decode()
    assert arch == {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl", "gemma3": "gemma3"}[family]
    template = bytes(text.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == processor.chat_template and PLACEHOLDER[family] in template
    proj = gguf.GGUFReader(files["mmproj_f32"])
    assert bytes(proj.fields["general.architecture"].parts[-1]).decode() == "clip"
    expected_type = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger", "gemma3": "gemma3"}[family]
    assert bytes(proj.fields["clip.projector_type"].parts[-1]).decode() == expected_type
    assert not any(t.name.startswith(("blk.", "token_embd")) for t in proj.tensors)
    assert not any(t.name.startswith(("v.", "mm.")) for t in text.tensors)
    modelfile = (directory / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.F16.gguf\nFROM ./mmproj-model.F32.gguf\n")
    assert "TEMPLATE" in modelfile


def test_image_embeddings_match_hf(exported):
    family, model, processor, files = exported
    image = sample_image(*image_size_for(family))
    ref = hf_image_features(model, image_inputs(processor, family)).numpy()
    for mmproj, atol in ((files["mmproj_f32"], F32_ATOL[family]), (files["mmproj_f16"], F16_ATOL[family])):
        runner = Mtmd(files["f16"], mmproj)
        got = runner.image_embeddings(image)
        runner.close()
        assert got.shape == ref.shape, f"{family}: llama.cpp made {got.shape[0]} image tokens, HF {ref.shape[0]}"
        diff = np.abs(got - ref).max()
        assert diff <= atol, f"{family} {mmproj.name}: max |embedding diff| {diff:.2e} > {atol}"


def test_quantized_files_load(exported):
    family, model, processor, files = exported
    runner = Mtmd(files["q8_0"], files["mmproj_q8_0"])
    got = runner.image_embeddings(sample_image(*image_size_for(family)))
    runner.close()
    diff = np.abs(got - hf_image_features(model, image_inputs(processor, family)).numpy()).max()
    assert diff <= Q8_ATOL, f"{family} q8_0 mmproj: max |embedding diff| {diff:.2e} > {Q8_ATOL}"


def _hf_logits(model, **inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits[0].float().numpy()


def test_text_only_logits_match(exported):
    family, model, processor, files = exported
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(files["f16"]), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    diff = np.abs(got - _hf_logits(model, input_ids=torch.tensor([ids]))).max()
    assert diff <= TEXT_ATOL, f"{family}: max |logit diff| {diff:.4f} on a text-only prompt"


def test_image_prompt_logits_match(exported):
    family, model, processor, files = exported
    inputs = image_inputs(processor, family)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    runner = Mtmd(files["f16"], files["mmproj_f32"])
    marker = AROUND_IMAGE[family] + mtmd.mtmd_default_marker().decode() + AROUND_IMAGE[family]
    chunks = runner.tokenize(prompt.replace(PLACEHOLDER[family], marker), sample_image(*image_size_for(family)))
    try:
        # llama.cpp sees the same text tokens around the image as the HF processor produced
        hf_ids = inputs["input_ids"][0].tolist()
        image_id = model.get_base_model().config.image_token_id
        hf_text = [t for i, t in enumerate(hf_ids) if t != image_id or (i and hf_ids[i - 1] != image_id)]
        hf_text = [-1 if t == image_id else t for t in hf_text]
        assert runner.text_ids(chunks) == hf_text, f"{family}: tokens around the image differ"
        got = runner.last_logits(chunks)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        runner.close()
    ref = _hf_logits(model, **inputs)[-1]
    diff = np.abs(got - ref).max()
    assert diff <= TEXT_ATOL, f"{family}: max |last-position logit diff| {diff:.4f} on an image+text prompt"


def test_unsupported_vlm_family_is_refused(tmp_path):
    from transformers import AutoConfig

    from pronghorn.export.gguf.mmproj_specs import projector_for

    config = AutoConfig.for_model("llava")
    with pytest.raises(NotImplementedError, match=r"'llava'.*supported: \['gemma3', 'qwen2_5_vl', 'qwen2_vl'\]"):
        projector_for(config)


def test_tokenizer_instead_of_processor_is_refused(tmp_path):
    model = lora_vlm("qwen2_vl")
    with pytest.raises(ValueError, match="pass its processor"):
        save_pretrained_gguf(model, tmp_path / "x", tiny_processor("qwen2_vl").tokenizer, "f16", ollama=False)
    assert not (tmp_path / "x").exists()


def test_modelfile_template_for_each_family(exported):
    family, _model, _processor, files = exported
    modelfile = (files["f16"].parent / "Modelfile").read_text()
    turn = {"gemma3": "<start_of_turn>", "qwen2_vl": "<|im_start|>", "qwen2_5_vl": "<|im_start|>"}[family]
    assert turn in modelfile
    stop = {"gemma3": "<end_of_turn>", "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>"}[family]
    assert f"PARAMETER stop {json.dumps(stop)}" in modelfile


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    from tests.export import ollama_render

    go = ollama_render.find_go()
    if go is None:
        pytest.skip(f"no Go toolchain to execute Ollama templates with; {ollama_render.GET_GO}")
    return ollama_render.build(go, tmp_path_factory.mktemp("ollama_render"))


def test_qwen_vl_ollama_template_renders_like_the_processor(go_renderer):
    from pronghorn.export.ollama_vision import QWEN_VL_OLLAMA_TEMPLATE
    from tests.export import ollama_render

    processor = tiny_processor("qwen2_vl")
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}],
    ]
    got = ollama_render.render(go_renderer, [{"template": QWEN_VL_OLLAMA_TEMPLATE, "messages": c}
                                             for c in conversations])
    for conv, text in zip(conversations, got):
        assert text == processor.apply_chat_template(conv, add_generation_prompt=True), conv
