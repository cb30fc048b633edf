"""SwiGLU kernel parity against the PyTorch reference (CPU under TRITON_INTERPRET, GPU when present)."""
import pytest
import torch
import torch.nn.functional as F

import pronghorn.kernels.swiglu.function as swiglu_function
from pronghorn.kernels.swiglu import swiglu, swiglu_reference
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pair(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    up = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return gate, up


def _fwd_bwd(fn, gate, up, dh, **kw):
    g = gate.detach().clone().requires_grad_()
    u = up.detach().clone().requires_grad_()
    # Multiply by one so the inputs are non-leaf, as projection outputs are.
    h = fn(g * 1, u * 1, **kw)
    if fn is swiglu:  # the kernel path ran, not the fallback
        assert type(h.grad_fn).__name__ == "SwiGLUFunctionBackward"
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 131), (1, 1000), (4, 2049)])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_reference(dtype, shape, inplace):
    gate, up = _pair(shape, dtype)
    dh = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = _fwd_bwd(swiglu, gate, up, dh, inplace_backward=inplace)
    want = _fwd_bwd(swiglu_reference, gate, up, dh)
    for a, b in zip(got, want):
        assert_close(a, b, dtype)


def test_matches_hf_eager_math():
    from transformers.activations import ACT2FN

    gate, up = _pair((6, 40), torch.float32)
    assert_close(swiglu(gate, up), ACT2FN["silu"](gate) * up)


def test_non_contiguous_views():
    # Phi-3 style: both halves of one fused projection output, and a transposed view.
    fused = torch.randn(5, 3, 2 * 24, device=DEVICE)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    dh = torch.randn(5, 3, 24, device=DEVICE)
    for a, b in zip(_fwd_bwd(swiglu, gate, up, dh, inplace_backward=True), _fwd_bwd(swiglu_reference, gate, up, dh)):
        assert_close(a, b)
    gate_t, up_t = torch.randn(24, 9, device=DEVICE).t(), torch.randn(24, 9, device=DEVICE).t()
    dh = torch.randn(9, 24, device=DEVICE)
    for a, b in zip(_fwd_bwd(swiglu, gate_t, up_t, dh), _fwd_bwd(swiglu_reference, gate_t, up_t, dh)):
        assert_close(a, b)


def test_inplace_backward_reuses_the_fused_buffer():
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    fused = x * 2
    gate, up = fused.chunk(2, dim=-1)
    seen = {}

    def record(grad):
        seen["gate"] = grad.data_ptr()

    gate.register_hook(record)
    h = swiglu(gate, up, inplace_backward=True)
    ptr = fused.data_ptr()
    h.sum().backward()
    assert seen["gate"] == ptr  # the gate gradient was written over the gate buffer
    x2 = x.detach().clone().requires_grad_()
    swiglu_reference(*(x2 * 2).chunk(2, dim=-1)).sum().backward()
    assert_close(x.grad, x2.grad)


def test_inplace_backward_refuses_second_backward():
    gate, up = _pair((3, 8), torch.float32)
    g = gate.clone().requires_grad_()
    h = swiglu(g * 1, up.clone().requires_grad_() * 1, inplace_backward=True)
    h.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        h.sum().backward()


def test_leaves_and_overlapping_inputs_are_never_overwritten():
    gate, up = _pair((3, 8), torch.float32)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    swiglu(g, u, inplace_backward=True).sum().backward()
    assert torch.equal(g.detach(), gate) and torch.equal(u.detach(), up)
    # The same tensor as gate and up: gradients must be summed, not written over each other.
    x = gate.clone().requires_grad_()
    swiglu(x * 1, x * 1, inplace_backward=True).sum().backward()
    x2 = gate.clone().requires_grad_()
    swiglu_reference(x2, x2).sum().backward()
    assert_close(x.grad, x2.grad)
    y = gate.clone().requires_grad_()
    t = y * 1
    swiglu(t, t, inplace_backward=True).sum().backward()
    assert_close(y.grad, x2.grad)


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(swiglu_function, "use_triton", lambda *t: False)
    gate, up = _pair((3, 8), torch.float32)
    g = gate.clone().requires_grad_()
    out = swiglu(g, up)
    out.sum().backward()
    assert_close(out.detach(), F.silu(gate) * up)
    assert g.grad is not None


def test_rejects_mismatched_inputs():
    gate, up = _pair((3, 8), torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(gate, up[:, :4])
    with pytest.raises(TypeError, match="same dtype"):
        swiglu(gate, up.double())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_sized(dtype):
    gate, up = _pair((2, 2048, 14336), dtype)
    dh = torch.randn_like(gate)
    for a, b in zip(_fwd_bwd(swiglu, gate, up, dh, inplace_backward=True), _fwd_bwd(swiglu_reference, gate, up, dh)):
        assert_close(a, b, dtype)


def _mlp_parity(family, activation, fused_gate_up):
    """mlp_forward on a real HF MLP module vs the module's own forward: output and all gradients."""
    from pronghorn.nn.activations import mlp_forward
    from tests.factories import tiny_model

    mlp = tiny_model(family).model.layers[0].mlp.to(DEVICE)
    x = torch.randn(2, 5, mlp.down_proj.out_features, device=DEVICE)
    results = []
    for fn in (lambda m, t: m(t), lambda m, t: mlp_forward(m, t, activation, fused_gate_up=fused_gate_up)):
        mlp.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(mlp, xi)
        out.pow(2).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in mlp.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, scale=10)  # HF's eager MLP rounds after silu; fp32 still agrees to ~1e-6


def test_mlp_forward_llama():
    _mlp_parity("llama", "swiglu", fused_gate_up=False)


def test_mlp_forward_phi3_fused_gate_up():
    _mlp_parity("phi3", "swiglu", fused_gate_up=True)


def test_activation_names_from_hf():
    from pronghorn.nn.activations import activation_for_hf, gated_activation

    assert activation_for_hf("silu") == "swiglu"
    assert activation_for_hf("gelu_pytorch_tanh") == "geglu_tanh"
    assert activation_for_hf("gelu") == "geglu_exact"
    with pytest.raises(ValueError, match="relu2"):
        activation_for_hf("relu2")
    with pytest.raises(ValueError, match="activation must be one of"):
        gated_activation(*_pair((2, 3), torch.float32), activation="reglu")


def test_gpu_tile_config_under_interpreter(monkeypatch):
    from pronghorn.kernels import gated_launch

    real = gated_launch.tile_config
    monkeypatch.setattr(gated_launch, "tile_config", lambda r, c, on_gpu: real(r, c, True))
    gate, up = _pair((5, 2100), torch.float32)
    dh = torch.randn(5, 2100, device=DEVICE)
    for a, b in zip(_fwd_bwd(swiglu, gate, up, dh, inplace_backward=True), _fwd_bwd(swiglu_reference, gate, up, dh)):
        assert_close(a, b)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_mlp_forward_under_activation_checkpointing(use_reentrant):
    # Checkpointing recomputes gate/up in backward; the in-place backward then overwrites the
    # recomputed buffers, which must give the same gradients as the module's own forward.
    from torch.utils.checkpoint import checkpoint

    from pronghorn.nn.activations import mlp_forward
    from tests.factories import tiny_model

    mlp = tiny_model("llama").model.layers[0].mlp.to(DEVICE)
    x = torch.randn(2, 5, mlp.down_proj.out_features, device=DEVICE)
    results = []
    for fn in (lambda t: mlp(t), lambda t: checkpoint(mlp_forward, mlp, t, use_reentrant=use_reentrant)):
        mlp.zero_grad()
        xi = x.clone().requires_grad_()
        fn(xi).pow(2).sum().backward()
        results.append([xi.grad] + [p.grad.clone() for p in mlp.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, scale=10)
