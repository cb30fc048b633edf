"""Fused LoRA projections with hand-written backward: linear/o_proj, q/k/v (and Phi-3 qkv_proj), gated MLP
(and Phi-3 gate_up_proj), over dense or bitsandbytes 4-bit base weights.

There is no Triton file here: the elementwise work is the SwiGLU/GeGLU kernels and the 4-bit weights go
through the NF4 dequantization kernel; everything else is cuBLAS GEMMs via torch.
"""
from .function import LoraSharedInputFunction, lora_linear, lora_o, lora_qkv, lora_qkv_fused
from .mlp import LoraMLPFunction, lora_mlp
from .parts import LoraParts
from .projection import compute_dtype

__all__ = ["LoraMLPFunction", "LoraParts", "LoraSharedInputFunction", "compute_dtype", "lora_linear", "lora_mlp",
           "lora_o", "lora_qkv", "lora_qkv_fused"]
