"""LayerNorm: ``(x - mean) / sqrt(var + eps) * weight + bias`` with fp32 statistics."""
from pronghorn.kernels.layer_norm.function import layer_norm

__all__ = ["layer_norm"]
