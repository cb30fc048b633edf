"""Fused LoRA paths against PEFT's own forward/backward on real PEFT-wrapped tiny models.

Every comparison checks the outputs and the gradients of the input and of every trainable LoRA weight.
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from pronghorn.kernels.lora import LoraParts, lora_linear, lora_mlp, lora_qkv
from pronghorn.kernels.lora.reference import lora_linear_reference, lora_mlp_reference, lora_qkv_reference
from pronghorn.nn.lora import (
    activation_of, fused_linear_forward, fused_mlp_forward, fused_o_forward, fused_qkv_forward, lora_parts,
)
from tests.factories import tiny_model
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


def _peft(model, r=8, dropout=0.0, targets=None, **kw):
    targets = targets or [n for n in ALL_PROJ if any(m.endswith(n) for m, _ in model.named_modules())]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets,
                     init_lora_weights=False, **kw)
    return get_peft_model(model, cfg)


def _run(fn, x, module, seed=0):
    """Outputs, x.grad and {name: grad} of trainable params of ``module`` for a fixed random projection loss."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    loss.backward()
    # params the computation does not touch (o_proj while testing q/k/v) have no grad in either path
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads
    return [o.detach() for o in outs], x.grad, grads


def _compare(fused, ref, dtype, scale=1.0):
    (o1, gx1, g1), (o2, gx2, g2) = fused, ref
    for a, b in zip(o1, o2):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, dtype, scale, msg="output")
    assert gx1.dtype == gx2.dtype
    assert_close(gx1, gx2, dtype, scale, msg="x grad")
    assert g1.keys() == g2.keys()
    for name in g1:
        # LoRA weight grads sum over every token: compare relative to their size
        ref_scale = max(1.0, g2[name].float().abs().max().item())
        assert_close(g1[name].float() / ref_scale, g2[name].float() / ref_scale, dtype, scale, msg=name)


def _layer(family, dtype, **peft_kw):
    model = tiny_model(family, dtype=dtype)
    return _peft(model, **peft_kw).base_model.model.model.layers[0]


def _x(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_mlp_matches_peft(dtype):
    layer = _layer("llama", dtype)
    mlp = layer.mlp
    assert activation_of(mlp) == "swiglu"
    assert all(lora_parts(m) is not None and lora_parts(m).A is not None
               for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = _x((2, 7, 64), dtype)
    fused = _run(lambda t: fused_mlp_forward(mlp, t, "swiglu", fallback=lambda _: pytest.fail("fell back")), x, mlp)
    _compare(fused, _run(mlp, x, mlp), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_attention_projections_match_peft(dtype):
    attn = _layer("llama", dtype).self_attn
    x = _x((3, 5, 64), dtype)
    fused = _run(lambda t: fused_qkv_forward(attn, t), x, attn)
    ref = _run(lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x, attn)
    _compare(fused, ref, dtype)
    xo = _x((3, 5, 64), dtype, seed=2)
    fused_o = _run(lambda t: fused_o_forward(attn, t), xo, attn.o_proj)
    _compare(fused_o, _run(attn.o_proj, xo, attn.o_proj), dtype)


def test_gemma_mlp_geglu_tanh():
    mlp = _layer("gemma", torch.float32).mlp
    assert activation_of(mlp) == "geglu_tanh"
    x = _x((2, 6, 64), torch.float32)
    _compare(_run(lambda t: fused_mlp_forward(mlp, t, "geglu_tanh"), x, mlp), _run(mlp, x, mlp), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phi3_fused_gate_up_and_qkv(dtype):
    layer = _layer("phi3", dtype)
    mlp, attn = layer.mlp, layer.self_attn
    x = _x((2, 5, 64), dtype)
    _compare(_run(lambda t: fused_mlp_forward(mlp, t, "swiglu", fallback=lambda _: pytest.fail("fell back")), x, mlp),
             _run(mlp, x, mlp), dtype)
    q = attn.config.num_attention_heads * attn.head_dim
    kv = attn.config.num_key_value_heads * attn.head_dim

    def ref(t):
        y = attn.qkv_proj(t)
        return y[..., :q], y[..., q:q + kv], y[..., q + kv:]

    _compare(_run(lambda t: fused_qkv_forward(attn, t), x, attn.qkv_proj), _run(ref, x, attn.qkv_proj),
             dtype)


def test_qwen2_qkv_with_frozen_bias():
    attn = _layer("qwen2", torch.float32).self_attn
    assert attn.q_proj.base_layer.bias is not None
    assert lora_parts(attn.q_proj).bias is attn.q_proj.base_layer.bias
    x = _x((2, 4, 64), torch.float32)
    fused = _run(lambda t: fused_qkv_forward(attn, t), x, attn)
    _compare(fused, _run(lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x, attn), torch.float32)


class _MLP(nn.Module):
    """A Llama-shaped MLP with arbitrary sizes (the factories' configs tie sizes to head counts)."""

    def __init__(self, hidden, inter, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_shapes_rank_one_noncontiguous_input(dtype):
    torch.manual_seed(0)
    wrapper = nn.Module()
    wrapper.mlp = _MLP(65, 33).to(dtype)
    mlp = _peft(wrapper, r=1, targets=["gate_proj", "up_proj", "down_proj"]).base_model.model.mlp
    x = _x((5, 3, 65), dtype).transpose(0, 1)  # [3, 5, 65], not contiguous
    assert not x.is_contiguous()
    _compare(_run(lambda t: fused_mlp_forward(mlp, t, "swiglu"), x, mlp), _run(mlp, x, mlp), dtype)
    lin = mlp.gate_proj
    _compare(_run(lambda t: fused_linear_forward(lin, t), x, lin), _run(lin, x, lin), dtype)


def test_mixed_lora_and_plain_projections():
    """Only some projections carry adapters: the others run as plain frozen linears inside the fused path."""
    torch.manual_seed(0)
    wrapper = nn.Module()
    wrapper.mlp = _MLP(32, 48)
    mlp = _peft(wrapper, targets=["up_proj"]).base_model.model.mlp
    assert lora_parts(mlp.gate_proj).A is None and lora_parts(mlp.up_proj).A is not None
    x = _x((4, 32), torch.float32)
    _compare(_run(lambda t: fused_mlp_forward(mlp, t, "swiglu"), x, mlp), _run(mlp, x, mlp), torch.float32)


def test_dropout_falls_back_and_matches_peft():
    layer = _layer("llama", torch.float32, dropout=0.1)
    layer.train()
    mlp, attn = layer.mlp, layer.self_attn
    assert lora_parts(mlp.gate_proj) is None and lora_parts(attn.q_proj) is None
    x = _x((2, 5, 64), torch.float32)
    torch.manual_seed(123)
    fused = _run(lambda t: fused_mlp_forward(mlp, t, "swiglu"), x, mlp)
    torch.manual_seed(123)
    ref = _run(mlp, x, mlp)
    _compare(fused, ref, torch.float32, scale=0.0)  # the very same computation: exact
    torch.manual_seed(7)
    fq = _run(lambda t: fused_qkv_forward(attn, t), x, attn)
    torch.manual_seed(7)
    rq = _run(lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x, attn)
    _compare(fq, rq, torch.float32, scale=0.0)


def test_lora_parts_declines_what_it_cannot_fuse():
    model = tiny_model("llama")
    peft_model = _peft(model)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_parts(q) is not None
    with peft_model.disable_adapter():
        assert lora_parts(q) is None
    q.merge()
    assert lora_parts(q) is None
    q.unmerge()
    peft_model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    q.set_adapter(["default", "second"])
    assert lora_parts(q) is None
    # the answer is cached per module: every change it depends on must be seen on the next call
    q.set_adapter("second")
    assert lora_parts(q).A is q.lora_A["second"].weight
    q.scaling["second"] = 3.0
    assert lora_parts(q).scale == 3.0
    q.set_adapter("default")
    assert lora_parts(q).A is q.lora_A["default"].weight
    dora = _peft(tiny_model("llama"), use_dora=True).base_model.model.model.layers[0].self_attn.q_proj
    assert lora_parts(dora) is None
    lbias = _peft(tiny_model("llama"), lora_bias=True).base_model.model.model.layers[0].self_attn.q_proj
    assert lora_parts(lbias) is None
    assert lora_parts(nn.Conv1d(2, 2, 1)) is None
    trainable = nn.Linear(4, 4)
    assert lora_parts(trainable) is None  # weight requires grad: not a frozen base
    trainable.requires_grad_(False)
    assert lora_parts(trainable).A is None


def test_lora_parts_recompute_reuses_the_forward_check_of_the_same_step_only(monkeypatch):
    """A backward recompute takes what its step's forward checked, without reading the module again; a new step, or
    a call outside a recompute, checks the module's state again."""
    import pronghorn.nn.lora as nn_lora
    from pronghorn.kernels.lora import cast_cache
    from pronghorn.memory.recompute import backward_recompute

    q = _peft(tiny_model("llama")).base_model.model.model.layers[0].self_attn.q_proj
    checks = []
    real_key = nn_lora._state_key
    monkeypatch.setattr(nn_lora, "_state_key", lambda m: checks.append(m) or real_key(m))
    try:
        cast_cache.begin_step()
        forward = lora_parts(q)
        with backward_recompute():
            assert lora_parts(q) is forward
        assert len(checks) == 1  # the recompute did not check again
        cast_cache.begin_step()
        q.scaling["default"] = 5.0  # changed before the next step's forward
        with backward_recompute():
            assert lora_parts(q).scale == 5.0  # no forward checked in this step: the recompute checks itself
        assert len(checks) == 2
        q.scaling["default"] = 6.0
        assert lora_parts(q).scale == 6.0  # outside a recompute every call checks
    finally:
        cast_cache.end_steps()
    with backward_recompute():
        assert lora_parts(q).scale == 6.0 and len(checks) == 4  # no step open: checks


def test_fallback_defaults_to_class_forward_when_bound_on_instance():
    """The wiring may bind fused_mlp_forward as the instance's forward; the fallback must not recurse."""
    import types

    layer = _layer("llama", torch.float32, dropout=0.1)
    mlp = layer.mlp
    mlp.eval()  # dropout off in eval, but lora_parts still declines (dropout module is not Identity)
    expected = mlp(_x((2, 3, 64), torch.float32))
    mlp.forward = types.MethodType(lambda self, t: fused_mlp_forward(self, t, "swiglu"), mlp)
    torch.testing.assert_close(mlp(_x((2, 3, 64), torch.float32)), expected, atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh", "geglu_exact"])
@pytest.mark.parametrize("fused_gate_up", [False, True])
def test_kernels_match_reference(activation, fused_gate_up):
    g = torch.Generator().manual_seed(0)

    def parts(out, inp, r):
        return LoraParts(torch.randn(out, inp, generator=g) * 0.2,
                         (torch.randn(r, inp, generator=g) * 0.2).requires_grad_(),
                         (torch.randn(out, r, generator=g) * 0.2).requires_grad_(), 0.5)

    x = torch.randn(2, 3, 24, generator=g)
    gate = parts(80 if fused_gate_up else 40, 24, 4)
    up = None if fused_gate_up else parts(40, 24, 3)
    down = parts(24, 40, 5)
    ps = [p for p in (gate, up, down) if p is not None]
    holder = nn.Module()
    holder.params = nn.ParameterList([nn.Parameter(t, requires_grad=True) for p in ps for t in (p.A, p.B)])
    ps = [p._replace(A=holder.params[2 * i], B=holder.params[2 * i + 1]) for i, p in enumerate(ps)]
    gate, up, down = (ps[0], None, ps[1]) if fused_gate_up else ps
    kw = dict(fused_gate_up=fused_gate_up)
    _compare(_run(lambda t: lora_mlp(t, gate, up, down, activation, **kw), x, holder),
             _run(lambda t: lora_mlp_reference(t, gate, up, down, activation, **kw), x, holder), torch.float32)


@pytest.mark.parametrize("fused_gate_up", [False, True])
def test_a_stash_with_a_gate_buffer_gets_the_gate_written_there_and_nothing_changes(fused_gate_up):
    """``GateUpStash.into``: the gate GEMM writes into the caller's buffer (a graphed layer's slot), the sink sees
    that buffer, and the output and gradients are bit-identical to a plain call."""
    from pronghorn.kernels.lora.mlp import GateUpStash
    from pronghorn.kernels.lora.projection import project

    g = torch.Generator().manual_seed(3)
    width = 2 * 40 if fused_gate_up else 40
    gate = LoraParts(torch.randn(width, 24, generator=g), (torch.randn(4, 24, generator=g) * 0.2).requires_grad_(),
                     (torch.randn(width, 4, generator=g) * 0.2).requires_grad_(), 0.5)
    up = None if fused_gate_up else LoraParts(torch.randn(40, 24, generator=g), None, None, 1.0)
    down = LoraParts(torch.randn(24, 40, generator=g), (torch.randn(2, 40, generator=g) * 0.2).requires_grad_(),
                     (torch.randn(24, 2, generator=g) * 0.2).requires_grad_(), 0.5)
    holder = nn.Module()
    holder.params = nn.ParameterList([nn.Parameter(t) for p in (gate, down) for t in (p.A, p.B)])
    gate = gate._replace(A=holder.params[0], B=holder.params[1])
    down = down._replace(A=holder.params[2], B=holder.params[3])
    x = torch.randn(2, 3, 24, generator=g)
    buffer, sunk = torch.full((6, width), float("nan")), []

    def into(shape, dtype, device):
        assert shape == tuple(buffer.shape) and dtype == buffer.dtype and device == buffer.device
        return buffer

    stash = GateUpStash(sink=sunk.extend, into=into)
    kw = dict(fused_gate_up=fused_gate_up)
    written = _run(lambda t: lora_mlp(t, gate, up, down, "swiglu", stash=stash, **kw), x, holder)
    assert sunk[0] is buffer
    plain = _run(lambda t: lora_mlp(t, gate, up, down, "swiglu", **kw), x, holder)
    torch.testing.assert_close(written, plain, atol=0, rtol=0)
    biased = LoraParts(gate.weight, None, None, 1.0, torch.randn(width, generator=g))
    x2 = x.reshape(6, 24)
    torch.testing.assert_close(project(x2, [biased], [None], torch.float32, [into])[0],
                               project(x2, [biased], [None], torch.float32)[0], atol=1e-6, rtol=1e-6)


def test_qkv_matches_reference_with_different_ranks():
    g = torch.Generator().manual_seed(0)
    holder = nn.Module()
    holder.params = nn.ParameterList([nn.Parameter(torch.randn(shape, generator=g) * 0.3)
                                      for shape in ((4, 24), (32, 4), (1, 24), (16, 1), (3, 24), (16, 3))])
    P = holder.params
    q = LoraParts(torch.randn(32, 24, generator=g), P[0], P[1], 2.0)
    k = LoraParts(torch.randn(16, 24, generator=g), P[2], P[3], 0.5)
    v = LoraParts(torch.randn(16, 24, generator=g), P[4], P[5], 1.0, torch.randn(16, generator=g))
    x = torch.randn(2, 3, 24, generator=g)
    _compare(_run(lambda t: lora_qkv(t, q, k, v), x, holder), _run(lambda t: lora_qkv_reference(t, q, k, v), x, holder),
             torch.float32)


def test_gradients_only_where_needed_and_single_backward():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=g)
    A = torch.randn(2, 8, generator=g, requires_grad=True)
    B = torch.randn(6, 2, generator=g)  # frozen B
    x = torch.randn(3, 8, generator=g)  # no grad for x
    lora_linear(x, W, A, B, 2.0).sum().backward()
    expected = torch.autograd.grad(lora_linear_reference(x, W, A, B, 2.0).sum(), A)[0]
    torch.testing.assert_close(A.grad, expected)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, W.clone().requires_grad_(), A, B)
    parts = LoraParts(torch.randn(8, 8, generator=g), None, None, 1.0)
    y = lora_mlp(x.requires_grad_(), parts, parts, parts)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        y.sum().backward()


def test_autocast_computes_in_autocast_dtype():
    g = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(16, 32, generator=g), torch.randn(4, 32, generator=g).requires_grad_(),
               torch.randn(16, 4, generator=g).requires_grad_())
    x = torch.randn(5, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, A, B, 0.5)
        y_ref = lora_linear_reference(x, W, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, torch.bfloat16)
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


def _nf4_mlp(hidden, inter, dtype, nested=True, device="cpu"):
    """A Llama-shaped MLP over bitsandbytes NF4 Linear4bit layers, PEFT-wrapped (the QLoRA layout)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = _MLP(hidden, inter)
    mlp = _MLP(hidden, inter)
    for name in ("gate_proj", "up_proj", "down_proj"):
        src = getattr(dense, name)
        layer = bnb.nn.Linear4bit(src.in_features, src.out_features, bias=False, compute_dtype=dtype,
                                  quant_type="nf4", compress_statistics=nested)
        layer.weight = bnb.nn.Params4bit(src.weight.data.to(dtype), requires_grad=False, quant_type="nf4",
                                         compress_statistics=nested)
        setattr(mlp, name, layer)
    wrapper = nn.Module()
    wrapper.mlp = mlp.to(device)  # moving to a device quantizes the Params4bit weights
    wrapper.is_loaded_in_4bit = True  # what transformers sets; makes PEFT pick its bitsandbytes LoRA layer
    model = _peft(wrapper, targets=["gate_proj", "up_proj", "down_proj"])
    for p in model.parameters():  # QLoRA keeps adapters in the compute dtype here
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model.base_model.model.mlp


def _check_nf4_mlp(hidden, inter, dtype, nested, device):
    mlp = _nf4_mlp(hidden, inter, dtype, nested, device)
    assert type(mlp.gate_proj).__module__.startswith("peft.tuners.lora.bnb")
    parts = lora_parts(mlp.gate_proj)
    assert parts is not None and parts.weight.dtype == torch.uint8 and parts.A is not None
    x = _x((2, 5, hidden), dtype).to(device)
    fused = _run(lambda t: fused_mlp_forward(mlp, t, "swiglu", fallback=lambda _: pytest.fail("fell back")), x, mlp)
    _compare(fused, _run(mlp, x, mlp), dtype)
    lin = mlp.down_proj
    xd = _x((3, inter), dtype, seed=4).to(device)
    _compare(_run(lambda t: fused_linear_forward(lin, t), xd, lin), _run(lin, xd, lin), dtype)


# bitsandbytes' CPU 4-bit matmul dequantizes each row in its own blocks, which is wrong (it disagrees with
# its quantizer and its CUDA kernel) when in_features is not a multiple of the blocksize; the CPU test keeps
# in_features at multiples of 64 and the GPU test covers 96.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_base_matches_peft_qlora(dtype, nested):
    _check_nf4_mlp(64, 128, dtype, nested, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_base_matches_peft_qlora_gpu(dtype):
    _check_nf4_mlp(64, 96, dtype, True, "cuda")


def test_int8_base_is_not_fused():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(16, 8, bias=False, has_fp16_weights=False)
    assert lora_parts(layer) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_gpu_matches_peft(dtype):
    layer = _layer("llama", dtype).to("cuda")
    mlp, attn = layer.mlp, layer.self_attn
    x = _x((2, 33, 64), dtype).to("cuda")
    _compare(_run(lambda t: fused_mlp_forward(mlp, t, "swiglu"), x, mlp), _run(mlp, x, mlp), dtype)
    _compare(_run(lambda t: fused_qkv_forward(attn, t), x, attn),
             _run(lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x, attn), dtype)


@pytest.mark.parametrize("reentrant", [False, True])
def test_under_activation_checkpointing(reentrant):
    """Recomputation hands the Function fresh saved tensors, so the in-place backward stays correct."""
    from torch.utils.checkpoint import checkpoint

    mlp = _layer("llama", torch.float32).mlp
    x = _x((2, 5, 64), torch.float32)

    def fused(t):
        return checkpoint(lambda u: fused_mlp_forward(mlp, u, "swiglu"), t, use_reentrant=reentrant)

    _compare(_run(fused, x, mlp), _run(mlp, x, mlp), torch.float32)


@pytest.mark.parametrize("down_a_trains", [True, False])
@pytest.mark.parametrize("fused_gate_up", [False, True])
def test_output_unused_skips_the_output_and_keeps_the_gradients(fused_gate_up, down_a_trains, monkeypatch):
    """The backward-recompute mode returns zeros (no down GEMM, no gated activation: backward makes h once, for
    down's A and B grads, over dh's buffer) yet gives the normal path's gradients."""
    import pronghorn.kernels.lora.mlp as mlp_module

    activations = []  # passes that make h: the forward activation, or a backward activation asked for h
    real_gated_forward, real_gated_backward = mlp_module.gated_forward, mlp_module.gated_backward_

    def counted_backward(*args, want_h=False, h_out=None):
        activations.extend([1] if want_h or h_out is not None else [])
        assert not want_h and h_out in (None, args[0]), "the backward writes h over dh, never into a new tensor"
        return real_gated_backward(*args, want_h=want_h, h_out=h_out)

    monkeypatch.setattr(mlp_module, "gated_forward", lambda *a: activations.append(1) or real_gated_forward(*a))
    monkeypatch.setattr(mlp_module, "gated_backward_", counted_backward)
    g = torch.Generator().manual_seed(3)

    def parts(out, inp, r):
        return LoraParts(torch.randn(out, inp, generator=g) * 0.2, torch.randn(r, inp, generator=g) * 0.2,
                         torch.randn(out, r, generator=g) * 0.2, 0.5)

    gate, down = parts(80 if fused_gate_up else 40, 24, 4), parts(24, 40, 5)
    up = None if fused_gate_up else parts(40, 24, 3)
    ps = [p for p in (gate, up, down) if p is not None]
    holder = nn.Module()
    holder.params = nn.ParameterList([nn.Parameter(t.clone()) for p in ps for t in (p.A, p.B)])
    holder.params[-2].requires_grad_(down_a_trains)
    ps = [p._replace(A=holder.params[2 * i], B=holder.params[2 * i + 1]) for i, p in enumerate(ps)]
    gate, up, down = (ps[0], None, ps[1]) if fused_gate_up else ps
    x = torch.randn(2, 3, 24, generator=g)
    dy = torch.randn(2, 3, 24, generator=g)

    def grads(output_unused):
        holder.zero_grad(set_to_none=True)
        activations.clear()
        xi = x.clone().requires_grad_()
        y = lora_mlp(xi, gate, up, down, fused_gate_up=fused_gate_up, output_unused=output_unused)
        y.backward(dy)
        return y.detach(), [xi.grad] + [p.grad.clone() for p in holder.params if p.requires_grad], len(activations)

    y_full, want, full_calls = grads(False)
    y_skip, got, skip_calls = grads(True)
    assert y_skip.shape == y_full.shape and not y_skip.any()
    assert (full_calls, skip_calls) == (2 if down_a_trains else 1, 1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_o_projection_output_unused_skips_the_gemm_and_keeps_the_gradients():
    """lora_o in backward-recompute mode: zeros of the output's shape (in != out features), no base GEMM, and the
    normal path's gradients for x, A and B."""
    from pronghorn.kernels.lora import lora_o

    g = torch.Generator().manual_seed(5)
    A = nn.Parameter(torch.randn(3, 20, generator=g) * 0.2)
    B = nn.Parameter(torch.randn(12, 3, generator=g) * 0.2)
    o = LoraParts(torch.randn(12, 20, generator=g) * 0.2, A, B, 2.0)
    x = torch.randn(2, 5, 20, generator=g).transpose(0, 1)  # non-contiguous
    dy = torch.randn(5, 2, 12, generator=g)

    def grads(output_unused):
        A.grad = B.grad = None
        xi = x.clone().requires_grad_()
        y = lora_o(xi, o, output_unused=output_unused)
        y.backward(dy)
        return y.detach(), [xi.grad, A.grad.clone(), B.grad.clone()]

    y_full, want = grads(False)
    y_skip, got = grads(True)
    assert y_skip.shape == y_full.shape == (5, 2, 12) and not y_skip.any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_mm_returns_the_parameter_dtype(dtype):
    """LoRA factor gradients come back in the parameter's dtype: fp32 straight from the GEMM on CUDA, a cast
    elsewhere; both within the 16-bit product's rounding of the fp32 product."""
    from pronghorn.kernels.lora.projection import grad_mm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    a = torch.randn(300, 32, generator=g).to(device, dtype).t()  # transposed, as dy^T and t^T are
    b = torch.randn(300, 72, generator=g).to(device, dtype)
    got = grad_mm(a, b, torch.float32)
    want = a.float() @ b.float()
    assert got.dtype == torch.float32 and got.shape == (32, 72)
    torch.testing.assert_close(got, want, atol=0.15, rtol=2e-2)
    assert grad_mm(a, b, dtype).dtype == dtype
