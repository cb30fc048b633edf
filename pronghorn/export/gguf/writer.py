"""Stream a (LoRA-merged) model into one GGUF file, one tensor at a time.

All tensor descriptors (name, shape, type, byte size) are known before any weight is computed, so
the header is written first and each tensor is merged, converted, written and freed in turn: memory
stays at about one layer, whatever the model size.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import gguf
import numpy as np
import torch

from pronghorn.export.gguf.arch import GGUFFamily, transform_tensor, write_arch_metadata
from pronghorn.export.gguf.quantize import (
    DIRECT_TYPES,
    encode_tensor,
    tensor_type,
    type_nbytes,
)
from pronghorn.export.gguf.tokenizer import GGUFVocab, write_tokenizer
from pronghorn.export.merge import MergePlan, TensorSource


@dataclasses.dataclass
class _Planned:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], torch.Tensor]     # tensor with llama.cpp conventions applied


def _from_source(src: TensorSource, config, family: GGUFFamily) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        return transform_tensor(src.name, src.load(), config, family)
    return produce


def plan_gguf_tensors(plan: MergePlan, family: GGUFFamily, method: str,
                      extra: dict[str, np.ndarray]) -> list[_Planned]:
    """Every tensor of the GGUF file in write order, with its llama.cpp name and type."""
    config = plan.config
    names = gguf.TensorNameMap(family.arch, config.num_hidden_layers)
    out: list[_Planned] = []
    for name, array in extra.items():
        out.append(_Planned(name, tuple(array.shape), gguf.GGMLQuantizationType.F32,
                            lambda a=array: torch.from_numpy(a)))
    by_name: dict[str, _Planned] = {}
    for src in plan.sources:
        gguf_name = names.get_name(src.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise NotImplementedError(f"no llama.cpp tensor name for {src.name!r} ({family.arch_name}); this "
                                      "checkpoint has weights llama.cpp's architecture does not expect")
        planned = _Planned(gguf_name, src.shape, tensor_type(gguf_name, src.shape, method),
                           _from_source(src, config, family))
        by_name[gguf_name] = planned
        out.append(planned)
    if "output.weight" not in by_name and not family.tied_output_fallback:
        emb = by_name["token_embd.weight"]
        out.append(_Planned("output.weight", emb.shape, tensor_type("output.weight", emb.shape, method),
                            emb.produce))
    return out


def gguf_nbytes(tensors: list[_Planned]) -> int:
    """Bytes of tensor data in the file (headers excluded)."""
    return sum(type_nbytes(t.shape, t.qtype) for t in tensors)


def write_gguf(path: str | os.PathLike, plan: MergePlan, family: GGUFFamily, vocab: GGUFVocab, method: str,
               model_name: str = "model") -> None:
    """Write ``plan``'s merged model as GGUF ``method`` (a directly-written type) to ``path``."""
    writer = gguf.GGUFWriter(os.fspath(path), family.arch_name)
    try:
        writer.add_name(model_name)
        writer.add_file_type(int(DIRECT_TYPES[method][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra = write_arch_metadata(writer, plan.config, family)
        write_tokenizer(writer, vocab)
        write_tensors(writer, plan_gguf_tensors(plan, family, method, extra))
    finally:
        writer.close()


def write_tensors(writer: gguf.GGUFWriter, tensors, prepare=lambda t: t) -> None:
    """Header, metadata and tensor table, then each tensor's data, produced and encoded one at a time
    (so memory holds one tensor, not the model). ``prepare`` adjusts each produced tensor before encoding."""
    for t in tensors:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), type_nbytes(t.shape, t.qtype),
                               raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        data = encode_tensor(prepare(t.produce()), t.qtype)
        writer.write_tensor_data(np.ascontiguousarray(data))
        del data
