"""Relaunching a compiled Triton kernel without the JIT's per-call work, for arguments that cannot change
their specialization.

``kernel[grid](*args)`` re-derives on every call how each argument specializes the binary (dtype,
16-byte alignment, integers equal to 1 or divisible by 16) to look the binary up: on an H100 host that
was 26 us per launch against 13 us for calling the compiled kernel's launcher (benchmarks/host_profile.py,
Triton 3.6). QLoRA training dequantizes every frozen weight three times a step, ~640 launches, at a point
where the host, not the GPU, sets the pace. :class:`CompiledLaunch` skips the lookup for a caller that
guarantees every later call passes arguments of the same specialization: the same tensors, except
outputs freshly allocated with the same dtype (the caching allocator aligns those to 512 bytes).

It relies on ``CompiledKernel.__getitem__(grid)`` returning a launcher that takes every kernel parameter
in signature order, constexprs included (Triton 3.6 through 3.9). Where that call fails, or off CUDA
(the CPU interpreter), every launch goes through the JIT as usual.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class CompiledLaunch:
    """The first call launches through the JIT and keeps the compiled kernel's launcher for later calls.

    Args:
        kernel: a ``@triton.jit`` function.
        grid: the launch grid (fixed for this object).
        constexprs: the constexpr arguments by name (fixed for this object).
        options: compile options such as ``num_warps`` (fixed for this object).

    Calls take the kernel's non-constexpr arguments positionally, in signature order.
    """

    def __init__(self, kernel, grid: tuple, constexprs: dict, **options):
        self.kernel, self.grid, self.constexprs, self.options = kernel, tuple(grid), dict(constexprs), options
        self.runner = None
        self.tail = ()
        self.jit_only = False

    def __call__(self, *args) -> None:
        if self.runner is not None:
            self.runner(*args, *self.tail)
            return
        compiled = self.kernel[self.grid](*args, **self.constexprs, **self.options)
        if not self.jit_only:
            self._keep(compiled, len(args))

    def _keep(self, compiled, n_args: int) -> None:
        names = list(getattr(self.kernel, "arg_names", []))
        try:
            if compiled is None or names[n_args:] != list(self.constexprs) or not hasattr(compiled, "__getitem__"):
                raise TypeError("no compiled launcher, or the constexprs are not the trailing parameters")
            grid = self.grid + (1,) * (3 - len(self.grid))
            self.runner, self.tail = compiled[grid], tuple(self.constexprs.values())
        except Exception as exc:  # an interpreter, or a Triton whose compiled-kernel API differs
            logger.debug("pronghorn: launching %s through the JIT every time (%r)", self.kernel, exc)
            self.jit_only = True
