"""Relaunching a compiled Triton kernel without the JIT's per-call work, for arguments that cannot change
their specialization.

``kernel[grid](*args)`` re-derives on every call how each argument specializes the binary (dtype,
16-byte alignment, integers equal to 1 or divisible by 16) to look the binary up: on an H100 host that
was 26 us per launch against 13 us for calling the compiled kernel's launcher (benchmarks/host_profile.py,
Triton 3.6); a training step makes ~1,000 launches. :class:`CompiledLaunch` skips the lookup for a caller
that guarantees every later call passes arguments of the same specialization (NF4 dequantization: the same
weight, a fresh output). :func:`launch` is for every other kernel: it keeps one ``CompiledLaunch`` per key
of its own, built from the arguments more cheaply than Triton's per-argument specialization.

It relies on ``CompiledKernel.__getitem__(grid)`` returning a launcher that takes every kernel parameter
in signature order, constexprs included (Triton 3.6 through 3.9). Where that call fails, or off CUDA
(the CPU interpreter), every launch goes through the JIT as usual.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Kept launchers per kernel; a workload whose shapes keep changing (every sequence length of an eval) would
# grow this without bound, so a kernel's launchers are dropped once it holds this many.
MAX_LAUNCHERS_PER_KERNEL = 64
_LAUNCHERS: dict = {}


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


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, **options) -> None:
    """``kernel[grid](*args, **constexprs, **options)``, through a kept :class:`CompiledLaunch` once a call
    with the same key was seen. ``args`` are the non-constexpr arguments in signature order, ``constexprs``
    the trailing constexpr ones in signature order.

    The key holds each scalar argument by type and value, and of each tensor its dtype, device and
    16-byte alignment: a finer split than the binary's specialization (which looks at dtypes,
    alignment and whether an integer is 1 or a multiple of 16), so a kept launcher is always the binary
    the JIT would pick. On the H100 host a JIT launch of the RMSNorm kernel took 47 us and a kept one 13
    (benchmarks/host_profile.py); building this key for the RoPE kernel's 34 arguments took 2.9 us on the
    CI machine.
    """
    key = (grid, *map(_arg_key, args), *constexprs.values(), *options.values())
    launchers = _LAUNCHERS.get(kernel)
    if launchers is None:
        launchers = _LAUNCHERS[kernel] = {}
    launcher = launchers.get(key)
    if launcher is None:
        if len(launchers) >= MAX_LAUNCHERS_PER_KERNEL:
            launchers.clear()
        launcher = launchers[key] = CompiledLaunch(kernel, grid, constexprs, **options)
    launcher(*args)


def _arg_key(arg):
    kind = type(arg)
    if kind is int:
        return arg
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.get_device(), arg.data_ptr() & 15 == 0
    return kind, arg  # floats, bools, None: by type too, since 1.0 == True == 1 as dict keys
