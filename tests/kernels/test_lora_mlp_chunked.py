"""The chunked LoRA MLP (kernels/lora/mlp_chunked.py): its forward without autograd and the backward of a recompute,
against the full-width path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pronghorn.kernels.dequant import weights
from pronghorn.kernels.lora import LoraParts, lora_mlp, mlp_chunked
from pronghorn.kernels.lora.activation import gated_backward_
from pronghorn.kernels.lora_gated.reference import LowRank
from tests.tolerances import assert_close

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _chunked_outside_capture():
    """The library chunks only while a CUDA graph is captured; these tests call the kernels directly."""
    mlp_chunked.set_chunked_mlp("always")
    yield
    mlp_chunked.set_chunked_mlp("capture")


def _nf4(out, inp, dtype, gen, device):
    w = (torch.randn(out, inp, generator=gen) * 0.2).to(dtype)
    return bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).to(device)


def _mlp(dtype, fused, device, hidden=64, inter=96, ranks=(4, 3, 5), down_a_trains=True, with_lora=True):
    """NF4 gate/up (or one fused gate_up) and down with LoRA factors held by a module, so they get grads."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(2 * inter, hidden)] if fused else [(inter, hidden), (inter, hidden)]
    shapes.append((hidden, inter))
    holder = nn.Module()
    holder.factors = nn.ParameterList()
    parts = []
    for (out, inp), r in zip(shapes, ranks):
        weight = _nf4(out, inp, dtype, gen, device)
        if not with_lora:
            parts.append(LoraParts(weight))
            continue
        a = nn.Parameter((torch.randn(r, inp, generator=gen) * 0.2).to(device))
        b = nn.Parameter((torch.randn(out, r, generator=gen) * 0.2).to(device))
        holder.factors.extend([a, b])
        parts.append(LoraParts(weight, a, b, 0.5))
    if with_lora:
        holder.factors[-2].requires_grad_(down_a_trains)
    return holder, parts


def _grads(holder, parts, fused, x, dy, output_unused, x_grad=True):
    holder.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(x_grad)
    gate, *rest = parts
    up, down = (None, rest[0]) if fused else rest
    y = lora_mlp(xi, gate, up, down, fused_gate_up=fused, output_unused=output_unused)
    torch.autograd.backward(y, dy)
    return [xi.grad] + [p.grad for p in holder.factors if p.requires_grad]


def _check(dtype, fused, device, monkeypatch, chunk_bytes, x_grad=True, **mlp_kw):
    monkeypatch.setattr(mlp_chunked, "CHUNK_BYTES", chunk_bytes)
    holder, parts = _mlp(dtype, fused, device, **mlp_kw)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=gen).to(device, dtype)
    dy = torch.randn(2, 5, 64, generator=gen).to(device, dtype)
    full, part_shapes = _record_decodes(monkeypatch)
    want = _grads(holder, parts, fused, x, dy, output_unused=False, x_grad=x_grad)
    full.clear()
    got = _grads(holder, parts, fused, x, dy, output_unused=True, x_grad=x_grad)
    return want, got, full, part_shapes



@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_backward_matches_the_unchunked_one(dtype, fused, monkeypatch):
    """Three chunks of 32 of the 96 intermediate rows: the same x, A and B gradients as the path that keeps
    full-width gate/up outputs, and each weight decoded once, a chunk at a time (gate and up rows, down
    columns), nothing whole."""
    want, got, full, parts = _check(dtype, fused, "cpu", monkeypatch, chunk_bytes=2 * 10 * 32 * dtype.itemsize)
    assert full == []  # the recompute decoded nothing, the backward only parts
    assert parts == [(32, 64), (32, 64), (64, 32)] * 3  # per chunk: gate rows, up rows, down columns
    assert len(got) == len(want) == (5 if fused else 7)  # x, then A and B of each projection
    for g, w in zip(got, want):
        ref = max(1.0, w.float().abs().max().item())
        assert_close(g.float() / ref, w.float() / ref, dtype)


@pytest.mark.parametrize("down_a_trains", [True, False])
def test_uneven_chunks_frozen_down_a_and_no_input_grad(down_a_trains, monkeypatch):
    """A budget of 22 rows: five chunks of 20, 20, 20, 20, 16 rows; down's A frozen or not; x needing no
    gradient (a first layer's input)."""
    want, got, _, ranges = _check(torch.float32, False, "cpu", monkeypatch, chunk_bytes=2 * 10 * 22 * 4,
                                  x_grad=False, down_a_trains=down_a_trains)
    assert ranges == [(20, 64), (20, 64), (64, 20)] * 4 + [(16, 64), (16, 64), (64, 16)]
    assert got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_without_adapters_only_the_input_gradient():
    _, parts = _mlp(torch.float32, False, "cpu", with_lora=False)
    x = torch.randn(3, 64)
    dy = torch.randn(3, 64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for xi, unused in zip(xs, (False, True)):
        lora_mlp(xi, *parts, output_unused=unused).backward(dy)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-5, rtol=1e-5)


def test_modes_decide_when_the_mlp_runs_chunked(monkeypatch):
    _, parts = _mlp(torch.float32, False, "cpu")
    for mode, expected in (("never", False), ("capture", False), ("always", True)):  # capture: no CUDA graph here
        mlp_chunked.set_chunked_mlp(mode)
        assert mlp_chunked.applies(parts[:2]) is expected
    assert mlp_chunked.applies([LoraParts(torch.zeros(4, 4))])
    assert not mlp_chunked.applies([LoraParts(torch.zeros(4, 4), bias=torch.zeros(4))])  # biases stay unchunked
    with pytest.raises(ValueError, match="one of .*'capture'.*got 'sometimes'"):
        mlp_chunked.set_chunked_mlp("sometimes")
    monkeypatch.setenv(mlp_chunked.ENV, "Sometimes")
    with pytest.raises(ValueError, match="PRONGHORN_CHUNKED_MLP='Sometimes': must be one of"):
        mlp_chunked._mode_from_env()
    monkeypatch.setenv(mlp_chunked.ENV, " Always ")
    assert mlp_chunked._mode_from_env() == "always"


@pytest.mark.gpu
def test_under_capture_only_a_quantized_base_runs_chunked():
    """Over a float base the chunks cost more GPU time than the smaller pool is worth (see set_chunked_mlp)."""
    bnb = pytest.importorskip("bitsandbytes")
    float_parts = [LoraParts(torch.zeros(64, 32, device="cuda", dtype=torch.bfloat16))]
    nf4 = bnb.nn.Params4bit(torch.randn(64, 32, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4").cuda()
    mlp_chunked.set_chunked_mlp("capture")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        picks = mlp_chunked.applies(float_parts), mlp_chunked.applies([LoraParts(nf4)])
    assert picks == (False, True)
    assert not mlp_chunked.applies([LoraParts(nf4)])  # not capturing


@pytest.mark.parametrize("fused", [False, True])
def test_float_bases_chunk_through_views(fused, monkeypatch):
    """bf16 base weights (no dequantization): the chunks use views of gate/up rows and down columns."""
    monkeypatch.setattr(mlp_chunked, "CHUNK_BYTES", 2 * 10 * 32 * 2)
    gen = torch.Generator().manual_seed(5)
    holder = nn.Module()
    holder.factors = nn.ParameterList()
    parts = []
    for out, inp, r in ([(192, 64, 4)] if fused else [(96, 64, 4), (96, 64, 3)]) + [(64, 96, 5)]:
        a = nn.Parameter(torch.randn(r, inp, generator=gen) * 0.2)
        b = nn.Parameter(torch.randn(out, r, generator=gen) * 0.2)
        holder.factors.extend([a, b])
        parts.append(LoraParts((torch.randn(out, inp, generator=gen) * 0.2).bfloat16(), a, b, 0.5))
    x = torch.randn(2, 5, 64, generator=gen).bfloat16()
    dy = torch.randn(2, 5, 64, generator=gen).bfloat16()
    want, got = (_grads(holder, parts, fused, x, dy, output_unused=unused) for unused in (False, True))
    for g, w in zip(got, want):
        ref = max(1.0, w.float().abs().max().item())
        assert_close(g.float() / ref, w.float() / ref, torch.bfloat16)


def _record_decodes(monkeypatch) -> tuple[list, list]:
    """Shapes of the whole weights and of the weight parts dequantized from now on."""
    full, part_shapes = [], []
    whole, part = weights._dequantize, weights.dequantize_nf4_part
    monkeypatch.setattr(weights, "_dequantize", lambda w, d: full.append(tuple(w.shape)) or whole(w, d))

    def recorded(*args):
        out = part(*args)
        part_shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(weights, "dequantize_nf4_part", recorded)
    return full, part_shapes


def _forward(parts, fused, x, mode):
    mlp_chunked.set_chunked_mlp(mode)
    gate, *rest = parts
    up, down = (None, rest[0]) if fused else rest
    with torch.no_grad():
        return lora_mlp(x, gate, up, down, fused_gate_up=fused)


def _check_forward(dtype, fused, device, monkeypatch):
    monkeypatch.setattr(mlp_chunked, "FORWARD_CHUNK_BYTES", 2 * 10 * 32 * dtype.itemsize)
    _, parts = _mlp(dtype, fused, device)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    want = _forward(parts, fused, x, "never")
    full, part_shapes = _record_decodes(monkeypatch)
    got = _forward(parts, fused, x, "always")
    assert full == []  # nothing decoded whole
    assert part_shapes == [(32, 64), (32, 64), (64, 32)] * 3  # per chunk: gate rows, up rows, down columns
    assert got.shape == want.shape == x.shape and got.dtype == want.dtype
    ref = max(1.0, want.float().abs().max().item())
    assert_close(got.float() / ref, want.float() / ref, dtype)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_forward_matches_the_full_width_one(dtype, fused, monkeypatch):
    """Without autograd, three chunks of 32 of the 96 intermediate rows give the full-width output, each
    weight decoded once, a part at a time."""
    _check_forward(dtype, fused, "cpu", monkeypatch)


def test_chunked_forward_with_float_bases_and_a_down_bias():
    gen = torch.Generator().manual_seed(11)
    parts = [LoraParts((torch.randn(96, 64, generator=gen) * 0.2).bfloat16(), torch.randn(4, 64, generator=gen),
                       torch.randn(96, 4, generator=gen), 0.5) for _ in range(2)]
    parts.append(LoraParts((torch.randn(64, 96, generator=gen) * 0.2).bfloat16(), torch.randn(5, 96, generator=gen),
                           torch.randn(64, 5, generator=gen), 2.0, torch.randn(64, generator=gen).bfloat16()))
    x = torch.randn(7, 64, generator=gen).bfloat16()
    want, got = (_forward(parts, False, x, mode) for mode in ("never", "always"))
    ref = max(1.0, want.float().abs().max().item())
    assert_close(got.float() / ref, want.float() / ref, torch.bfloat16)


def test_chunked_forward_without_adapters(monkeypatch):
    monkeypatch.setattr(mlp_chunked, "FORWARD_CHUNK_BYTES", 2 * 3 * 40 * 4)
    _, parts = _mlp(torch.float32, False, "cpu", with_lora=False)
    x = torch.randn(3, 64)
    want, got = (_forward(parts, False, x, mode) for mode in ("never", "always"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_forward_autograd_records_stays_full_width(monkeypatch):
    """With gradients wanted the forward must keep what backward needs, so it runs the full-width Function."""
    _, parts = _mlp(torch.float32, False, "cpu")
    full, part_shapes = _record_decodes(monkeypatch)
    y = lora_mlp(torch.randn(3, 64), *parts)
    assert y.grad_fn is not None
    assert len(full) == 3 and part_shapes == []  # gate, up and down decoded whole


@pytest.mark.parametrize("tokens,inter,expected", [(4096, 14336, 2048), (10, 96, 96), (1, 5, 5)])
def test_chunk_rows_fill_the_budget_evenly(tokens, inter, expected):
    assert mlp_chunked.chunk_rows(tokens, inter, 2) == expected
    assert mlp_chunked.chunk_rows(tokens, inter, 2, budget=2 * mlp_chunked.CHUNK_BYTES) >= expected


def test_the_forward_takes_larger_chunks():
    assert mlp_chunked.chunk_rows(4096, 14336, 2, budget=mlp_chunked.FORWARD_CHUNK_BYTES) == 3584  # four chunks


def test_activation_backward_can_write_h_over_dh():
    gen = torch.Generator().manual_seed(0)
    dh, g, u = (torch.randn(6, 40, generator=gen) for _ in range(3))
    low = (LowRank(torch.randn(6, 3, generator=gen), torch.randn(40, 3, generator=gen), 0.5), None)
    g2, u2, dh2 = g.clone(), u.clone(), dh.clone()
    _, _, h = gated_backward_(dh, g, u, "swiglu", low, want_h=True)
    gated_backward_(dh2, g2, u2, "swiglu", low, h_out=dh2)
    for a, b in ((g2, g), (u2, u), (dh2, h)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_backward_on_the_gpu(dtype, fused, monkeypatch):
    want, got, _, parts = _check(dtype, fused, "cuda", monkeypatch, chunk_bytes=2 * 10 * 32 * dtype.itemsize)
    assert parts == [(32, 64), (32, 64), (64, 32)] * 3
    for g, w in zip(got, want):
        ref = max(1.0, w.float().abs().max().item())
        assert_close(g.float() / ref, w.float() / ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_forward_on_the_gpu(dtype, fused, monkeypatch):
    _check_forward(dtype, fused, "cuda", monkeypatch)
