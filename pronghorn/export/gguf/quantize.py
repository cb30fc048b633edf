"""GGUF tensor types: names users pass, per-tensor type choice, and the quantizers.

Types llama.cpp stores block-wise (q8_0, q4_0, ...) need a row length divisible by the block size
(32, or 256 for k-quants). Like llama.cpp, a tensor whose rows do not divide falls back to a
wider type (here f16) rather than failing; 1-D tensors (norms, biases) always stay f32.

q8_0 is computed with torch (bit-identical to ggml's reference rounding, checked by a test against
the ``gguf`` package's numpy quantizer) because it is the common export and numpy is single-threaded;
q4_0/q4_1/q5_0/q5_1 use the ``gguf`` package's numpy quantizers; k-quants are produced by llama.cpp's
own quantizer through llama-cpp-python, from an f16 GGUF written first.
"""
from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# method name -> (tensor type for 2-D weights, file type). Written directly by pronghorn.
DIRECT_TYPES = {
    "f32": (Q.F32, F.ALL_F32),
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
}
# method name -> llama.cpp file type; produced by llama.cpp's quantizer from an f16 file.
LLAMA_CPP_TYPES = {
    "q2_k": F.MOSTLY_Q2_K, "q3_k_s": F.MOSTLY_Q3_K_S, "q3_k_m": F.MOSTLY_Q3_K_M, "q3_k_l": F.MOSTLY_Q3_K_L,
    "q4_k_s": F.MOSTLY_Q4_K_S, "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_s": F.MOSTLY_Q5_K_S, "q5_k_m": F.MOSTLY_Q5_K_M,
    "q6_k": F.MOSTLY_Q6_K, "iq4_xs": F.MOSTLY_IQ4_XS, "iq4_nl": F.MOSTLY_IQ4_NL,
}
# Unsloth's names for the common choices.
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "fp16": "f16",
           "float16": "f16", "bfloat16": "bf16", "float32": "f32", "fp32": "f32", "q4_k": "q4_k_m",
           "q5_k": "q5_k_m", "q3_k": "q3_k_m"}
# Small quantized types keep embeddings and the output head at q8_0 (they dominate quality at 4-5 bits).
_KEEP_Q8 = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}

LLAMA_CPP_INSTALL = ('pip install llama-cpp-python  (builds llama.cpp from source, about 6 minutes on 2 cores; '
                     'CMAKE_ARGS="-DGGML_NATIVE=OFF" makes a portable build)')


def normalize_methods(quantization_method: str | list[str] | tuple[str, ...]) -> list[str]:
    """Lower-cased, alias-resolved, de-duplicated method names; unknown names are an error."""
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    out: list[str] = []
    for m in methods:
        name = ALIASES.get(str(m).lower(), str(m).lower())
        if name not in DIRECT_TYPES and name not in LLAMA_CPP_TYPES:
            raise ValueError(f"unknown quantization_method {m!r}; choose from {sorted(DIRECT_TYPES)} (written "
                             f"directly) or {sorted(LLAMA_CPP_TYPES)} (need llama-cpp-python), or aliases "
                             f"{sorted(ALIASES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("quantization_method is empty; pass e.g. 'q8_0' or ['q8_0', 'q4_k_m']")
    return out


def tensor_type(gguf_name: str, shape: tuple[int, ...], method: str) -> gguf.GGMLQuantizationType:
    """The GGUF type of one tensor under ``method`` (a direct method), with llama.cpp-style fallbacks."""
    if len(shape) < 2:
        return Q.F32
    qtype = DIRECT_TYPES[method][0]
    if qtype in _KEEP_Q8 and (gguf_name.startswith(("token_embd", "output."))):
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block != 0:
        return Q.F16
    return qtype


def type_nbytes(shape: tuple[int, ...], qtype) -> int:
    """Bytes one tensor takes in the file."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    numel = int(np.prod(shape))
    return numel // block * size


def _roundf(x: torch.Tensor) -> torch.Tensor:
    # ggml rounds half away from zero; torch.round rounds half to even.
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _q8_0_rows(t: torch.Tensor) -> torch.Tensor:
    blocks = t.reshape(-1, 32).float()
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _roundf(blocks * inv).to(torch.int8)
    d16 = d.to(torch.float16).view(torch.uint8)          # (n_blocks, 2), little-endian on all our hosts
    return torch.cat([d16, qs.view(torch.uint8)], dim=1).reshape(t.shape[0], -1)


def quantize_q8_0(t: torch.Tensor, chunk_elements: int = 1 << 24) -> np.ndarray:
    """Q8_0 blocks (fp16 scale + 32 int8) of a 2-D tensor, as uint8 rows, matching ggml's reference.

    Rows are processed in chunks of about ``chunk_elements`` so the fp32 temporaries stay small
    (an embedding matrix would otherwise need several copies of itself in fp32).
    """
    rows, cols = t.shape
    out = np.empty((rows, cols // 32 * 34), dtype=np.uint8)
    step = max(1, chunk_elements // cols)
    for start in range(0, rows, step):
        out[start:start + step] = _q8_0_rows(t[start:start + step]).cpu().numpy()
    return out


def encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """Bytes (or a float array) of fp32 tensor ``t`` in GGUF type ``qtype``."""
    if qtype == Q.F32:
        return t.float().cpu().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).cpu().numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint8)
    if qtype == Q.Q8_0:
        return quantize_q8_0(t)
    return gguf.quants.quantize(t.float().cpu().numpy(), qtype)


def llama_cpp_quantize(src: str | os.PathLike, dst: str | os.PathLike, method: str, threads: int | None = None) -> None:
    """Quantize GGUF ``src`` to ``dst`` with llama.cpp's quantizer (k-quants, i-quants)."""
    require_llama_cpp([method])
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_CPP_TYPES[method])
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(os.fsencode(str(src)), os.fsencode(str(dst)), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp failed to quantize {src} to {method} (return code {rc}); see its log above")


def require_llama_cpp(methods: list[str]) -> None:
    """Fail before writing anything when a method needs llama-cpp-python and it is missing."""
    needs = [m for m in methods if m in LLAMA_CPP_TYPES]
    if not needs:
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        raise ImportError(f"quantization_method {needs} is made by llama.cpp's quantizer, which pronghorn calls "
                          f"through llama-cpp-python. Install it: {LLAMA_CPP_INSTALL}. Or choose one of "
                          f"{sorted(DIRECT_TYPES)}, which need nothing extra") from err
