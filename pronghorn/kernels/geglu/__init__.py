"""GeGLU, ``gelu(gate) * up`` (tanh or exact erf GELU): Triton kernels, autograd Function, reference."""
from pronghorn.kernels.geglu.function import GeGLUFunction, geglu
from pronghorn.kernels.geglu.reference import geglu_reference

__all__ = ["GeGLUFunction", "geglu", "geglu_reference"]
