"""Compute kernels: each op in its own package with a Triton kernel, an autograd Function and a
plain PyTorch reference. Nothing here imports transformers."""
