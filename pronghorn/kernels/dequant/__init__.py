"""bitsandbytes NF4 dequantization (Triton kernel + PyTorch reference) and dense views of base weights."""
from .function import dequantize_nf4
from .reference import NF4_VALUES, dequantize_nf4_reference
from .weights import dense_weight, is_quantized, weight_of

__all__ = ["NF4_VALUES", "dense_weight", "dequantize_nf4", "dequantize_nf4_reference", "is_quantized", "weight_of"]
