"""save_pretrained_gguf: merged model -> GGUF file(s) (+ Ollama Modelfile), written atomically."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from pronghorn.export.atomic import atomic_output_dir
from pronghorn.export.gguf.arch import family_for, write_arch_metadata
from pronghorn.export.gguf.mmproj import (
    check_mmproj_method,
    mmproj_nbytes,
    plan_mmproj_tensors,
    write_mmproj,
)
from pronghorn.export.gguf.mmproj_specs import ProjectorSpec, projector_for
from pronghorn.export.gguf.quantize import (
    DIRECT_TYPES,
    LLAMA_CPP_TYPES,
    llama_cpp_quantize,
    normalize_methods,
    require_llama_cpp,
)
from pronghorn.export.gguf.tokenizer import build_vocab
from pronghorn.export.gguf.writer import gguf_nbytes, plan_gguf_tensors, write_gguf
from pronghorn.export.merge import TensorSource, plan_merge
from pronghorn.export.model_card import build_model_card
from pronghorn.export.vlm import is_vision_language, split_vlm_plan

_HEADER_SLACK = 64 * 2**20


def gguf_filename(stem: str, method: str) -> str:
    """File name of one quantization, e.g. ``model.Q8_0.gguf``."""
    return f"{stem}.{method.upper()}.gguf"


def mmproj_filename(stem: str, method: str) -> str:
    """File name of a vision projector, e.g. ``mmproj-model.F16.gguf`` (the prefix LM Studio and others look for)."""
    return f"mmproj-{stem}.{method.upper()}.gguf"


@dataclasses.dataclass
class _VisionPart:
    sources: list[TensorSource]
    spec: ProjectorSpec
    config: object            # the full VLM config
    image_processor: object


def _processor_parts(processor, config) -> tuple[object, object]:
    """``(tokenizer, image_processor)`` of a VLM's processor, or an error saying what to pass."""
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise ValueError(f"{config.model_type!r} is a vision-language model: pass its processor "
                         "(AutoProcessor.from_pretrained(...) or the one FastVisionModel returned), not "
                         f"a {type(processor).__name__}; the projector file needs the image processor's "
                         "normalisation and the text GGUF the tokenizer")
    return tokenizer, image_processor


def _estimated_bytes(plan, family, methods: list[str]) -> int:
    import gguf

    probe = gguf.GGUFWriter(None, family.arch_name)
    extra_shapes = write_arch_metadata(probe, plan.config, family)
    total = 0
    need_f16 = False
    for m in methods:
        if m in LLAMA_CPP_TYPES:
            need_f16 = True
            # a k-quant is at most ~q8_0-sized; count it as such
            total += gguf_nbytes(plan_gguf_tensors(plan, family, "q8_0", extra_shapes))
        else:
            total += gguf_nbytes(plan_gguf_tensors(plan, family, m, extra_shapes))
    if need_f16 and "f16" not in methods:
        total += gguf_nbytes(plan_gguf_tensors(plan, family, "f16", extra_shapes))
    return total + _HEADER_SLACK * len(methods)


def save_pretrained_gguf(model: nn.Module, save_directory: str | os.PathLike, tokenizer,
                         quantization_method: str | list[str] = "q8_0", *, overwrite: bool = False,
                         file_stem: str = "model", ollama: bool = True, chat_template: str | None = None,
                         training_settings: dict | None = None, threads: int | None = None,
                         mmproj_quantization: str = "f16") -> list[Path]:
    """Write the LoRA-merged model as GGUF for llama.cpp / Ollama / LM Studio.

    A vision-language model (Qwen2-VL, Qwen2.5-VL, Gemma 3) becomes two kinds of file: its language
    model as a text GGUF per method (``model.Q8_0.gguf``, chat template with image placeholders inside),
    and its vision encoder + projector as one llama.cpp mmproj file (``mmproj-model.F16.gguf``), which
    ``llama-mtmd-cli -m model.Q8_0.gguf --mmproj mmproj-model.F16.gguf`` and the Modelfile's second
    ``FROM`` line load.

    Args:
        model: the (PEFT) model; read only, merged tensor by tensor.
        save_directory: output folder, written atomically (temporary sibling, renamed at the end).
        tokenizer: the fast tokenizer used in training; its vocabulary, special tokens and chat template
            go into the file. For a vision-language model, its processor.
        quantization_method: one name or a list: ``"f16"``, ``"bf16"``, ``"f32"``, ``"q8_0"``, ``"q4_0"``,
            ``"q4_1"``, ``"q5_0"``, ``"q5_1"`` (written directly), or k-quants ``"q4_k_m"``, ``"q5_k_m"``,
            ``"q6_k"``, ``"q2_k"``, ``"q3_k_m"``, ... (made by llama.cpp's quantizer; needs
            ``pip install llama-cpp-python``). Unsloth's ``"not_quantized"``, ``"fast_quantized"`` and
            ``"quantized"`` mean f16, q8_0 and q4_k_m.
        overwrite: replace a non-empty ``save_directory``.
        file_stem: files are named ``<file_stem>.<METHOD>.gguf``.
        ollama: also write an Ollama ``Modelfile`` for the first method; needs the tokenizer to carry a
            registered chat template (or ``chat_template=`` naming one). A VLM's Modelfile also names the
            mmproj file and, without a registered template, uses its family's turn format.
        chat_template: registered chat template name for the Modelfile, overriding detection.
        training_settings: extra entries for the README.md model card.
        threads: threads for llama.cpp's quantizer (default: all cores).
        mmproj_quantization: type of a VLM's projector file: ``"f16"`` (default, as llama.cpp recommends),
            ``"bf16"``, ``"f32"`` or ``"q8_0"``.

    Returns the paths of the GGUF files written (text files first, then the mmproj file of a VLM).
    """
    methods = normalize_methods(quantization_method)
    require_llama_cpp(methods)
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: GGUF files carry the vocabulary")
    plan = plan_merge(model)
    vision = None
    text_tokenizer = tokenizer
    if is_vision_language(plan.config):
        check_mmproj_method(mmproj_quantization)
        spec = projector_for(plan.config)
        parts = split_vlm_plan(plan)
        text_tokenizer, image_processor = _processor_parts(tokenizer, plan.config)
        vision = _VisionPart(parts.vision, spec, plan.config, image_processor)
        plan = parts.text
    family = family_for(plan.config)
    vocab = build_vocab(text_tokenizer, plan.config.vocab_size)
    if vision is not None and isinstance(getattr(tokenizer, "chat_template", None), str):
        vocab.chat_template = tokenizer.chat_template   # the processor's template places the image tokens
    pieces = None
    if ollama:
        if vision is not None:
            from pronghorn.export.ollama_vision import vision_ollama_pieces

            pieces = vision_ollama_pieces(tokenizer, vision.config.model_type, chat_template)
        else:
            from pronghorn.export.ollama import ollama_pieces_for

            pieces = ollama_pieces_for(tokenizer, chat_template)
    config_name = getattr(vision.config if vision is not None else plan.config, "_name_or_path", "")
    model_name = str(config_name or file_stem).rstrip("/").split("/")[-1] or file_stem
    target = Path(save_directory).expanduser().resolve()
    written: list[str] = []
    required = _estimated_bytes(plan, family, methods)
    if vision is not None:
        required += mmproj_nbytes(plan_mmproj_tensors(vision.sources, vision.spec, mmproj_quantization))
    with atomic_output_dir(target, overwrite=overwrite, required_bytes=required, what=f"GGUF {methods}") as tmp:
        f16_path = None
        for method in methods:
            out = tmp / gguf_filename(file_stem, method)
            if method in DIRECT_TYPES:
                write_gguf(out, plan, family, vocab, method, model_name=model_name)
            else:
                if f16_path is None:
                    f16_path = tmp / gguf_filename(file_stem, "f16")
                    if "f16" not in methods or not f16_path.exists():
                        write_gguf(f16_path, plan, family, vocab, "f16", model_name=model_name)
                llama_cpp_quantize(f16_path, out, method, threads)
            written.append(out.name)
        if f16_path is not None and "f16" not in methods:
            f16_path.unlink()
        projector = None
        if vision is not None:
            projector = mmproj_filename(file_stem, mmproj_quantization)
            write_mmproj(tmp / projector, vision.sources, vision.spec, vision.config, vision.image_processor,
                         mmproj_quantization, model_name=model_name)
        if pieces is not None:
            from pronghorn.export.ollama import write_modelfile

            write_modelfile(tmp, written[0], *pieces, projector=projector)
        card = build_model_card(model, "gguf", quant=", ".join(m.upper() for m in methods),
                                training_settings=training_settings, files=[p.name for p in tmp.iterdir()])
        (tmp / "README.md").write_text(card)
    return [target / name for name in written] + ([target / projector] if projector else [])
