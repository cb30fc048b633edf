"""Rotary position embedding of Q and K in one kernel, taking Hugging Face's cos/sin."""
from pronghorn.kernels.rope.function import apply_rope

__all__ = ["apply_rope"]
