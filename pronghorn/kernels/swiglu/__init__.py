"""SwiGLU, ``silu(gate) * up``: Triton kernels, autograd Function, PyTorch reference."""
from pronghorn.kernels.swiglu.function import SwiGLUFunction, swiglu
from pronghorn.kernels.swiglu.reference import swiglu_reference

__all__ = ["SwiGLUFunction", "swiglu", "swiglu_reference"]
