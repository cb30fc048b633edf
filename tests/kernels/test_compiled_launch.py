"""CompiledLaunch and ``launch``: off CUDA (the CPU interpreter) every call goes through the JIT and computes the
same; ``launch`` keys its kept launchers by what can change the binary; on the GPU every hot kernel relaunches
through a kept launcher."""
import pytest
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


def test_launch_keys_by_alignment_dtype_and_scalar_type(monkeypatch):
    """``launch`` keeps one launcher per key; what could pick another binary gets another key."""
    import pronghorn.kernels.compiled_launch as cl

    monkeypatch.setattr(cl, "_LAUNCHERS", {})
    x = torch.arange(17, dtype=torch.float32)

    def run(src, factor):
        out = torch.empty_like(src)
        cl.launch(_scale_kernel, (triton.cdiv(src.numel(), 8),), (src, out, src.numel(), factor), dict(BLOCK=8),
                  num_warps=1)
        assert torch.equal(out, src * factor)

    run(x[:16], 2.0)
    run(x[:16], 3.0)  # another float value: its own key (floats are keyed by value)
    run(x[:16], 2.0)
    assert len(cl._LAUNCHERS[_scale_kernel]) == 2
    run(x[1:], 2.0)  # a view 4 bytes past a 16-byte boundary (another specialization), and 16 elements
    run(x[:16].double(), 2.0)
    assert len(cl._LAUNCHERS[_scale_kernel]) == 4
    assert cl._arg_key(1) != cl._arg_key(1.0) != cl._arg_key(True)  # equal as dict keys, not for Triton


def test_launch_drops_a_kernels_launchers_past_the_limit(monkeypatch):
    import pronghorn.kernels.compiled_launch as cl

    monkeypatch.setattr(cl, "_LAUNCHERS", {})
    monkeypatch.setattr(cl, "MAX_LAUNCHERS_PER_KERNEL", 3)
    for n in range(1, 8):  # seven lengths, as an eval over ever-changing shapes would give
        x = torch.ones(n)
        out = torch.empty_like(x)
        cl.launch(_scale_kernel, (1,), (x, out, n, 2.0), dict(BLOCK=8), num_warps=1)
        assert torch.equal(out, x * 2)
        assert len(cl._LAUNCHERS[_scale_kernel]) <= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_hot_kernels_relaunch_through_kept_launchers_with_equal_results():
    """Every kernel a training step launches: the first call compiles through the JIT, the second goes
    through the kept launcher (no silent fallback to the JIT) and computes the same, bit for bit."""
    import pronghorn.kernels.compiled_launch as cl
    from pronghorn.kernels.cross_entropy import fused_linear_cross_entropy
    from pronghorn.kernels.geglu import geglu
    from pronghorn.kernels.layer_norm import layer_norm
    from pronghorn.kernels.lora_gated import LowRank
    from pronghorn.kernels.lora_gated.triton import lora_gated_backward, lora_gated_forward
    from pronghorn.kernels.rms_norm import rms_norm
    from pronghorn.kernels.rope import apply_rope
    from pronghorn.kernels.swiglu import swiglu

    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda", dtype=dtype).requires_grad_()

    x, w, gate, up = rand(64, 256), rand(256), rand(64, 512), rand(64, 512)
    q, k, cos, sin = rand(2, 4, 16, 64), rand(2, 2, 16, 64), rand(2, 16, 64), rand(2, 16, 64)
    low = LowRank(rand(64, 16).detach(), rand(512, 16).detach(), 0.5)
    head, labels = rand(1000, 256), torch.randint(0, 1000, (64,), device="cuda", generator=g)

    def step():
        outs = [rms_norm(x, w), layer_norm(x, w), swiglu(gate, up), geglu(gate, up),
                *apply_rope(q, k, cos, sin), fused_linear_cross_entropy(x, head, labels)]
        sum(o.float().sum() for o in outs).backward()
        h = lora_gated_forward(gate.detach(), up.detach(), low, low, "swiglu")
        dg, du = torch.empty_like(h), torch.empty_like(h)
        lora_gated_backward(torch.ones_like(h), gate.detach(), up.detach(), dg, du, low, low, "swiglu")
        grads = [t.grad.clone() for t in (x, w, gate, up, q, k, head)]
        for t in (x, w, gate, up, q, k, head):
            t.grad = None
        return [o.detach() for o in outs] + [h, dg, du] + grads

    first, second = step(), step()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    kept = [launcher for launchers in cl._LAUNCHERS.values() for launcher in launchers.values()]
    assert kept and all(launcher.runner is not None and not launcher.jit_only for launcher in kept)
