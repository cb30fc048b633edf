"""GeGLU kernel parity (tanh and exact erf GELU) against the PyTorch reference and HF activations."""
import pytest
import torch
import torch.nn.functional as F

import pronghorn.kernels.geglu.function as geglu_function
from pronghorn.kernels.geglu import geglu, geglu_reference
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
APPROX = ["tanh", "none"]


def _pair(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Wide range so both GELU tails (and tanh saturation) are exercised.
    gate = (torch.randn(shape, generator=gen) * 4).to(DEVICE, dtype)
    up = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return gate, up


def _fwd_bwd(fn, gate, up, dh, *args, **kw):
    g = gate.detach().clone().requires_grad_()
    u = up.detach().clone().requires_grad_()
    h = fn(g * 1, u * 1, *args, **kw)
    if fn is geglu:  # the kernel path ran, not the fallback
        assert type(h.grad_fn).__name__ == "GeGLUFunctionBackward"
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 131), (4, 1000)])
def test_matches_reference(approximate, dtype, shape):
    gate, up = _pair(shape, dtype)
    dh = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = _fwd_bwd(geglu, gate, up, dh, approximate, inplace_backward=True)
    want = _fwd_bwd(geglu_reference, gate, up, dh, approximate)
    for a, b in zip(got, want):
        assert_close(a, b, dtype)


def test_matches_torch_and_hf_activations():
    from transformers.activations import ACT2FN

    gate, up = _pair((6, 300), torch.float32)
    assert_close(geglu(gate, up, "tanh"), F.gelu(gate, approximate="tanh") * up)
    assert_close(geglu(gate, up, "tanh"), ACT2FN["gelu_pytorch_tanh"](gate) * up)
    assert_close(geglu(gate, up, "tanh"), ACT2FN["gelu_new"](gate) * up)
    assert_close(geglu(gate, up, "none"), ACT2FN["gelu"](gate) * up)
    # The two forms really differ, so the flag is honoured.
    assert not torch.allclose(geglu(gate, up, "tanh"), geglu(gate, up, "none"), atol=1e-6, rtol=0)


def test_extreme_inputs_stay_finite():
    gate = torch.tensor([[-1e4, -50.0, -10.0, 0.0, 10.0, 50.0, 1e4]], device=DEVICE)
    up = torch.ones_like(gate)
    for approximate in APPROX:
        got = _fwd_bwd(geglu, gate, up, torch.ones_like(gate), approximate)
        want = _fwd_bwd(geglu_reference, gate, up, torch.ones_like(gate), approximate)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            assert_close(a, b)


def test_non_contiguous_views():
    fused = torch.randn(3, 4, 2 * 40, device=DEVICE) * 3
    gate, up = fused.chunk(2, dim=-1)
    dh = torch.randn(3, 4, 40, device=DEVICE)
    for approximate in APPROX:
        got = _fwd_bwd(geglu, gate, up, dh, approximate)
        for a, b in zip(got, _fwd_bwd(geglu_reference, gate, up, dh, approximate)):
            assert_close(a, b)


def test_rejects_unknown_approximation():
    gate, up = _pair((2, 4), torch.float32)
    with pytest.raises(ValueError, match="approximate"):
        geglu(gate, up, "fast")


def test_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(geglu_function, "use_triton", lambda *t: False)
    gate, up = _pair((3, 8), torch.float32)
    g = gate.clone().requires_grad_()
    out = geglu(g, up, "none")
    out.sum().backward()
    assert_close(out.detach(), F.gelu(gate) * up)
    assert g.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROX)
def test_gpu_gemma_sized(approximate):
    gate, up = _pair((2, 2048, 16384), torch.bfloat16)
    dh = torch.randn_like(gate)
    got = _fwd_bwd(geglu, gate, up, dh, approximate, inplace_backward=True)
    for a, b in zip(got, _fwd_bwd(geglu_reference, gate, up, dh, approximate)):
        assert_close(a, b, torch.bfloat16)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_mlp_forward_gemma(family):
    from pronghorn.nn.activations import activation_for_hf, mlp_forward
    from tests.factories import tiny_model

    model = tiny_model(family)
    cfg = model.config  # Gemma names it hidden_act, Gemma-2 hidden_activation
    activation = activation_for_hf(getattr(cfg, "hidden_activation", None) or cfg.hidden_act)
    assert activation == "geglu_tanh"
    mlp = model.model.layers[0].mlp.to(DEVICE)
    x = torch.randn(2, 5, model.config.hidden_size, device=DEVICE)
    results = []
    for fn in (lambda t: mlp(t), lambda t: mlp_forward(mlp, t, activation)):
        mlp.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.pow(2).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in mlp.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, scale=10)  # HF rounds after the activation; fp32 agrees to ~1e-6


def test_gpu_tile_config_under_interpreter(monkeypatch):
    from pronghorn.kernels import gated_launch

    real = gated_launch.tile_config
    monkeypatch.setattr(gated_launch, "tile_config", lambda r, c, on_gpu: real(r, c, True))
    gate, up = _pair((5, 2100), torch.float32)
    dh = torch.randn(5, 2100, device=DEVICE)
    for approximate in APPROX:
        got = _fwd_bwd(geglu, gate, up, dh, approximate)
        for a, b in zip(got, _fwd_bwd(geglu_reference, gate, up, dh, approximate)):
            assert_close(a, b)
