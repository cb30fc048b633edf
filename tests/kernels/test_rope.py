"""RoPE kernel parity: Triton (interpreter on CPU) against the reference and transformers' own functions."""
import pytest
import torch

import pronghorn.kernels.rope.function as rope_fn
from pronghorn.kernels.rope import apply_rope
from pronghorn.kernels.rope.reference import rope_reference
from pronghorn.nn.rope import apply_rotary_pos_emb, apply_rotary_pos_emb_interleaved
from tests.tolerances import assert_close

B, S, HQ, HK, D = 2, 3, 4, 2, 16


def _qk(dtype, unsqueeze_dim=1, hq=HQ, hk=HK, d=D):
    if unsqueeze_dim == 1:
        return torch.randn(B, hq, S, d, dtype=dtype), torch.randn(B, hk, S, d, dtype=dtype)
    return torch.randn(B, S, hq, d, dtype=dtype), torch.randn(B, S, hk, d, dtype=dtype)


def _forward_backward(fn, q, k, cos, sin, gq, gk, prepare=None):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    qi, ki = prepare(q, k) if prepare else (q, k)
    qo, ko = fn(qi, ki, cos, sin)
    # Clones: an in-place backward may overwrite the gradient buffers it is handed.
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq.clone(), gk.clone()))
    return qo, ko, dq, dk


def _compare(fn, ref, q, k, cos, sin, prepare=None, dtype=None, scale=1.0):
    q_shape, k_shape = (t.shape for t in (prepare(q, k) if prepare else (q, k)))
    gq = torch.randn(q_shape, dtype=q.dtype, device=q.device)
    gk = torch.randn(k_shape, dtype=k.dtype, device=k.device)
    got = _forward_backward(fn, q, k, cos, sin, gq, gk, prepare)
    want = _forward_backward(ref, q, k, cos, sin, gq, gk, prepare)
    for name, a, e in zip(("q", "k", "dq", "dk"), got, want):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, dtype=dtype, scale=scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotary_dim", [D, 6], ids=["full", "partial"])
def test_matches_reference(dtype, rotary_dim):
    torch.manual_seed(rotary_dim)
    q, k = _qk(dtype)
    cos, sin = torch.randn(B, S, rotary_dim, dtype=dtype), torch.randn(B, S, rotary_dim, dtype=dtype)
    _compare(apply_rope, rope_reference, q, k, cos, sin)


def test_heads_second_layout_and_broadcast_cos():
    torch.manual_seed(1)
    q, k = _qk(torch.float32, unsqueeze_dim=2)
    cos, sin = torch.randn(1, S, 8), torch.randn(1, S, 8)
    _compare(
        lambda *a: apply_rope(*a, unsqueeze_dim=2), lambda *a: rope_reference(*a, unsqueeze_dim=2), q, k, cos, sin
    )


@pytest.mark.parametrize("rotary_dim", [D, 10], ids=["full", "partial"])
def test_interleaved_matches_reference(rotary_dim):
    torch.manual_seed(2)
    q, k = _qk(torch.float32)
    cos, sin = torch.randn(B, S, rotary_dim), torch.randn(B, S, rotary_dim)
    _compare(
        lambda *a: apply_rope(*a, interleaved=True), lambda *a: rope_reference(*a, interleaved=True), q, k, cos, sin
    )


def test_strided_views_like_hugging_face_and_inputs_untouched():
    torch.manual_seed(3)
    # q as HF makes it: projection output [B, S, H*D] viewed and transposed to [B, H, S, D];
    # k as a slice of a fused qkv projection.
    q_proj = torch.randn(B, S, HQ * D)
    qkv = torch.randn(B, S, (HQ + 2 * HK) * D)
    cos, sin = torch.randn(1, S, D), torch.randn(1, S, D)

    def prepare(qp, kvp):
        qv = qp.view(B, S, HQ, D).transpose(1, 2)
        kv = kvp[..., HQ * D:(HQ + HK) * D].view(B, S, HK, D).transpose(1, 2)
        assert not qv.is_contiguous() and not kv.is_contiguous()
        return qv, kv

    _compare(apply_rope, rope_reference, q_proj, qkv, cos, sin, prepare=prepare)
    q, k = prepare(q_proj, qkv)
    q_before, k_before = q.clone(), k.clone()
    apply_rope(q, k, cos, sin)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def test_input_gradients_take_the_inputs_layout():
    # q/k as transposed views of projection outputs: their gradients come back in the projections' own
    # layout, so the projection backward reshapes them to [tokens, features] without a copy.
    torch.manual_seed(4)
    cos, sin = torch.randn(1, S, D), torch.randn(1, S, D)
    q_proj = torch.randn(B, S, HQ * D, requires_grad=True)
    k_proj = torch.randn(B, S, HK * D, requires_grad=True)
    q = q_proj.view(B, S, HQ, D).transpose(1, 2)
    k = k_proj.view(B, S, HK, D).transpose(1, 2)
    seen = {}

    def keep(name):
        def hook(grad):
            seen[name] = grad
        return hook

    q.register_hook(keep("q"))
    k.register_hook(keep("k"))
    qo, ko = apply_rope(q, k, cos, sin)
    (qo.square().sum() + ko.sum()).backward()
    assert seen["q"].stride() == q.stride() and seen["k"].stride() == k.stride()
    want = _forward_backward(rope_reference, q_proj.view(B, S, HQ, D).transpose(1, 2).detach(),
                             k_proj.view(B, S, HK, D).transpose(1, 2).detach(), cos, sin,
                             2 * qo.detach(), torch.ones_like(ko))
    assert_close(seen["q"], want[2])
    assert_close(seen["k"], want[3])


@pytest.mark.parametrize("rotary_dim", [D, 6], ids=["full", "partial"])
def test_inplace_forward_is_exact_under_autograd(rotary_dim):
    torch.manual_seed(4)
    q, k = _qk(torch.float32)
    cos, sin = torch.randn(1, S, rotary_dim), torch.randn(1, S, rotary_dim)

    def prepare(qp, kp):
        # Rotating a leaf in place is illegal; rotate non-leaf views, as inside a model.
        return (qp * 1).transpose(1, 2), (kp * 1).transpose(1, 2)

    def inplace(qi, ki, c, s):
        q_out, k_out = apply_rope(qi, ki, c, s, unsqueeze_dim=2, inplace=True)
        assert q_out is qi and k_out is ki
        return q_out, k_out

    _compare(inplace, lambda *a: rope_reference(*a, unsqueeze_dim=2), q, k, cos, sin, prepare=prepare)


@pytest.mark.parametrize("rotary_dim", [D, 6], ids=["full", "partial"])
def test_inplace_without_autograd_rotates_both_where_they_lie(rotary_dim):
    torch.manual_seed(11)
    q_base, kv_base = torch.randn(B, S, HQ * D), torch.randn(B, S, 2 * HK * D)
    q = q_base.view(B, S, HQ, D).transpose(1, 2)
    k = kv_base[..., : HK * D].view(B, S, HK, D).transpose(1, 2)
    cos, sin = torch.randn(B, S, rotary_dim), torch.randn(B, S, rotary_dim)
    q_ref, k_ref = rope_reference(q, k, cos, sin)
    v_before = kv_base[..., HK * D:].clone()
    with torch.no_grad():
        q_out, k_out = apply_rope(q, k, cos, sin, inplace=True)
    assert q_out is q and k_out is k
    assert_close(q_base.view(B, S, HQ, D).transpose(1, 2), q_ref)
    assert_close(k, k_ref)
    assert torch.equal(kv_base[..., HK * D:], v_before)


def test_inplace_backward_reuses_buffers_and_respects_aliasing():
    torch.manual_seed(5)
    q = torch.randn(B, HQ, S, D, requires_grad=True)
    k = torch.randn(B, HQ, S, D, requires_grad=True)
    cos, sin = torch.randn(1, S, D), torch.randn(1, S, D)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    want = torch.autograd.grad(rope_reference(q, k, cos, sin), (q, k), (gq.clone(), gk.clone()))
    got = torch.autograd.grad(apply_rope(q, k, cos, sin, inplace_backward=True), (q, k), (gq, gk))
    assert got[0].data_ptr() == gq.data_ptr() and got[1].data_ptr() == gk.data_ptr()
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    # Both outputs summed: autograd hands the same gradient tensor to q and k; it must not be reused.
    qo, ko = apply_rope(q, k, cos, sin, inplace_backward=True)
    got = torch.autograd.grad((qo + ko).pow(2).sum(), (q, k))
    qr, kr = rope_reference(q, k, cos, sin)
    want = torch.autograd.grad((qr + kr).pow(2).sum(), (q, k))
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_cos_requiring_grad_uses_reference_and_gets_gradient():
    torch.manual_seed(6)
    q, k = _qk(torch.float32)
    cos = torch.randn(1, S, D, requires_grad=True)
    sin = torch.randn(1, S, D)
    qo, ko = apply_rope(q, k, cos, sin)
    (dcos,) = torch.autograd.grad((qo.sum() + ko.sum()), cos)
    qr, kr = rope_reference(q, k, cos, sin)
    assert_close(dcos, torch.autograd.grad(qr.sum() + kr.sum(), cos)[0])


def test_int64_specialisation_matches(monkeypatch):
    monkeypatch.setattr(rope_fn, "offsets_need_int64", lambda *t: True)
    torch.manual_seed(7)
    q, k = _qk(torch.float32)
    cos, sin = torch.randn(B, S, 12), torch.randn(B, S, 12)
    _compare(apply_rope, rope_reference, q, k, cos, sin)


def test_reference_fallback_when_triton_unavailable(monkeypatch):
    monkeypatch.setattr(rope_fn, "use_triton", lambda *t: False)

    def fail(*args):
        raise AssertionError("the Triton path ran although use_triton is False")

    monkeypatch.setattr(rope_fn.RoPEFunction, "apply", fail)
    q, k = _qk(torch.float32)
    cos, sin = torch.randn(1, S, D), torch.randn(1, S, D)
    for a, e in zip(apply_rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(a, e)


# Packed batch: the first row holds three sequences, each restarting its positions at 0.
PACKED_POSITIONS = torch.tensor([[0, 1, 0], [0, 1, 2]])
ROPE_CONFIGS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
}


def _hf_cos_sin(config, rotary_cls, dtype):
    emb = rotary_cls(config)
    return emb(torch.randn(1, dtype=dtype), PACKED_POSITIONS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", list(ROPE_CONFIGS))
def test_matches_transformers_llama(rope, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    config = LlamaConfig(
        hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D,
        max_position_embeddings=64, rope_parameters=dict(ROPE_CONFIGS[rope]),
    )
    cos, sin = _hf_cos_sin(config, modeling_llama.LlamaRotaryEmbedding, dtype)
    assert cos.shape == (B, S, D) and cos.dtype == dtype
    torch.manual_seed(8)
    q, k = _qk(dtype)
    _compare(apply_rotary_pos_emb, modeling_llama.apply_rotary_pos_emb, q, k, cos, sin)


def test_matches_transformers_phi3_partial_rotary():
    from transformers import Phi3Config
    from transformers.models.phi3 import modeling_phi3

    config = Phi3Config(
        hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HK,
        partial_rotary_factor=0.5, max_position_embeddings=64,
    )
    cos, sin = _hf_cos_sin(config, modeling_phi3.Phi3RotaryEmbedding, torch.float32)
    assert cos.shape[-1] == D // 2
    torch.manual_seed(9)
    q, k = _qk(torch.float32)
    _compare(apply_rotary_pos_emb, modeling_phi3.apply_rotary_pos_emb, q, k, cos, sin)


def test_matches_transformers_cohere_interleaved():
    from transformers import CohereConfig
    from transformers.models.cohere import modeling_cohere

    config = CohereConfig(
        hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HK, max_position_embeddings=64
    )
    cos, sin = _hf_cos_sin(config, modeling_cohere.CohereRotaryEmbedding, torch.bfloat16)
    torch.manual_seed(10)
    q, k = _qk(torch.bfloat16)
    _compare(apply_rotary_pos_emb_interleaved, modeling_cohere.apply_rotary_pos_emb, q, k, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rotary_dim", [128, 64], ids=["full", "partial"])
@pytest.mark.parametrize("heads", [(32, 8), (28, 4), (40, 40)])
def test_gpu_large_shapes(dtype, rotary_dim, heads):
    torch.manual_seed(0)
    b, s, d = 2, 1024, 128
    hq, hk = heads
    q = torch.randn(b, s, hq * d, dtype=dtype, device="cuda")
    k = torch.randn(b, s, hk * d, dtype=dtype, device="cuda")
    cos = torch.randn(b, s, rotary_dim, dtype=dtype, device="cuda")
    sin = torch.randn(b, s, rotary_dim, dtype=dtype, device="cuda")

    def prepare(qp, kp):
        return qp.view(b, s, hq, d).transpose(1, 2), kp.view(b, s, hk, d).transpose(1, 2)

    _compare(apply_rope, rope_reference, q, k, cos, sin, prepare=prepare)
    _compare(
        lambda *a: apply_rope(*a, inplace_backward=True), rope_reference, q, k, cos, sin, prepare=prepare
    )


@pytest.mark.gpu
def test_gpu_int64_sized_input():
    b, s, hq, hk, d = 1, 2**31 // (16 * 128) + 8, 16, 2, 128
    q = torch.randn(b, s, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(b, s, hk, d, dtype=torch.bfloat16, device="cuda")
    cos = torch.randn(1, s, d, dtype=torch.bfloat16, device="cuda")
    sin = torch.randn(1, s, d, dtype=torch.bfloat16, device="cuda")
    qo, ko = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    tail = slice(s - 4, s)
    qr, kr = rope_reference(q[:, tail], k[:, tail], cos[:, tail], sin[:, tail], unsqueeze_dim=2)
    assert_close(qo[:, tail], qr)
    assert_close(ko[:, tail], kr)
