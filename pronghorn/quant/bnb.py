"""bitsandbytes quantization configs, with a clear message where bitsandbytes cannot run."""
from __future__ import annotations

import importlib.util
import platform

import torch


class QuantizationUnavailableError(RuntimeError):
    pass


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes quantized loading cannot work here, or None if it can."""
    if importlib.util.find_spec("bitsandbytes") is None:
        where = f"{platform.system()} {platform.machine()}"
        return (f"bitsandbytes is not installed on this machine ({where}). Install it with "
                "`pip install bitsandbytes` (Linux x86_64 with a CUDA GPU), or load in 16-bit instead "
                "(load_in_4bit=False, load_in_8bit=False).")
    if not torch.cuda.is_available():
        return ("4-bit/8-bit loading needs a CUDA GPU: bitsandbytes' quantized matmuls are not supported for "
                "training on this CPU-only machine. Load in 16/32-bit instead (load_in_4bit=False, "
                "load_in_8bit=False), or run on a machine with an NVIDIA GPU.")
    return None


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype,
                        skip_modules: list[str] | None = None):
    """A transformers BitsAndBytesConfig: NF4 with double quantization (compute in ``compute_dtype``) or int8."""
    if not (load_in_4bit or load_in_8bit):
        return None
    problem = bitsandbytes_problem()
    if problem:
        raise QuantizationUnavailableError(problem)
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
