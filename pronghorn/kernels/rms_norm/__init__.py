"""RMSNorm: ``x / sqrt(mean(x^2) + eps) * (offset + w)`` with Llama or Gemma dtype handling."""
from pronghorn.kernels.rms_norm.function import rms_norm

__all__ = ["rms_norm"]
