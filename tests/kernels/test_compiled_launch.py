"""CompiledLaunch off CUDA: under the CPU interpreter every call goes through the JIT and computes the same."""
import torch
import triton
import triton.language as tl

from pronghorn.kernels.compiled_launch import CompiledLaunch


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * factor, mask=mask)


def test_repeated_launches_compute_each_time_and_fall_back_to_the_jit_off_cuda():
    x = torch.arange(10, dtype=torch.float32)
    launch = CompiledLaunch(_scale_kernel, (triton.cdiv(10, 8),), dict(BLOCK=8), num_warps=1)
    for factor in (2.0, 3.0):
        out = torch.empty_like(x)
        launch(x, out, 10, factor)
        assert torch.equal(out, x * factor)
    assert launch.runner is None and launch.jit_only

