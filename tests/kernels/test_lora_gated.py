"""LoRA-corrected gated activation kernels against the PyTorch reference (CPU under TRITON_INTERPRET, GPU
when present): forward ``h`` and the backward's ``dg``/``du`` against autograd through the reference."""
import pytest
import torch

from pronghorn.kernels.lora_gated import LowRank, lora_gated_backward_reference, lora_gated_reference
from pronghorn.kernels.lora_gated.triton import lora_gated_backward, lora_gated_forward
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = ["swiglu", "geglu_tanh", "geglu_exact"]


def _randn(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def _case(rows, cols, rank, dtype, sides="both", seed=0):
    gen = torch.Generator().manual_seed(seed)
    g, u, dh = (_randn(gen, rows, cols, scale=2.0, dtype=dtype) for _ in range(3))

    def low(scale):
        return LowRank(_randn(gen, rows, rank, dtype=dtype), _randn(gen, cols, rank, scale=0.3, dtype=dtype), scale)

    low_g = low(2.0) if sides in ("both", "gate") else None
    low_u = low(0.5) if sides in ("both", "up") else None
    return g, u, dh, low_g, low_u


def _autograd_reference(g, u, dh, low_g, low_u, activation):
    """dL/dg and dL/du of the reference (fp32 autograd), the gradients the kernel must write."""
    g32, u32 = g.float().requires_grad_(), u.float().requires_grad_()
    lows = [None if lo is None else LowRank(lo.xa.float(), lo.B.float(), lo.scale) for lo in (low_g, low_u)]
    h = lora_gated_reference(g32, u32, *lows, activation)
    h.backward(dh.float())
    return g32.grad, u32.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows,cols,rank", [(1, 1, 1), (5, 37, 8), (33, 70, 16), (17, 300, 32), (3, 24, 65)])
def test_forward_and_backward_match_reference(dtype, activation, rows, cols, rank):
    g, u, dh, low_g, low_u = _case(rows, cols, rank, dtype)
    # fp32: the corrected inputs reach ~10 and the kernel's tanh goes through exp, so products of such
    # terms differ from torch's by a few ulps of the operands, more than 1e-5 of a small result.
    scale = 4.0 if dtype == torch.float32 else 1.0
    assert_close(lora_gated_forward(g, u, low_g, low_u, activation), lora_gated_reference(g, u, low_g, low_u,
                                                                                          activation), dtype, scale)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    lora_gated_backward(dh, g, u, dg, du, low_g, low_u, activation)
    want_dg, want_du = _autograd_reference(g, u, dh, low_g, low_u, activation)
    assert_close(dg, want_dg.to(dtype), dtype, scale)
    assert_close(du, want_du.to(dtype), dtype, scale)


@pytest.mark.parametrize("sides", ["gate", "up"])
def test_one_side_without_lora(sides):
    g, u, dh, low_g, low_u = _case(9, 40, 4, torch.float32, sides=sides)
    assert_close(lora_gated_forward(g, u, low_g, low_u, "swiglu"), lora_gated_reference(g, u, low_g, low_u, "swiglu"))
    dg, du = lora_gated_backward_reference(dh, g, u, low_g, low_u, "swiglu")
    lora_gated_backward(dh, g, u, g, u, low_g, low_u, "swiglu")  # in place, as the fused MLP runs it
    assert_close(g, dg)
    assert_close(u, du)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sides", ["both", "none"])
@pytest.mark.parametrize("rows,cols,rank", [(5, 37, 8), (33, 70, 32)])
def test_backward_adds_the_factored_share_of_dh(dtype, sides, rows, cols, rank):
    # The fused MLP passes down's LoRA share of dh as t [N, r] and A_d [r, I], its B being the strided A_d^T.
    g, u, dh, low_g, low_u = _case(rows, cols, rank, dtype, sides="both" if sides == "both" else "neither", seed=7)
    gen = torch.Generator().manual_seed(8)
    a_down = _randn(gen, rank, cols, scale=0.3, dtype=dtype)
    low_dh = LowRank(_randn(gen, rows, rank, dtype=dtype), a_down.t(), 1.0)
    dh_before = dh.clone()
    want_dg, want_du = _autograd_reference(g, u, dh.float() + low_dh.dense(), low_g, low_u, "swiglu")
    scale = 4.0 if dtype == torch.float32 else 1.0
    lora_gated_backward(dh, g, u, g, u, low_g, low_u, "swiglu", low_dh=low_dh)
    assert_close(g, want_dg.to(dtype), dtype, scale)
    assert_close(u, want_du.to(dtype), dtype, scale)
    assert torch.equal(dh, dh_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_writes_the_forward_output_in_the_same_pass(dtype, activation):
    # In place, as the fused MLP runs it: h must come from g/u before the gradients overwrite them.
    g, u, dh, low_g, low_u = _case(21, 90, 8, dtype, seed=11)
    want_h = lora_gated_reference(g, u, low_g, low_u, activation)
    want_dg, want_du = _autograd_reference(g, u, dh, low_g, low_u, activation)
    h = torch.full_like(g, float("nan"))
    lora_gated_backward(dh, g, u, g, u, low_g, low_u, activation, h=h)
    scale = 4.0 if dtype == torch.float32 else 1.0
    assert_close(h, want_h, dtype, scale)
    assert_close(g, want_dg.to(dtype), dtype, scale)
    assert_close(u, want_du.to(dtype), dtype, scale)


def test_zero_lora_term_equals_plain_activation():
    from pronghorn.kernels.swiglu import swiglu_reference

    g, u, _, low_g, low_u = _case(12, 50, 8, torch.float32)
    zero = LowRank(low_g.xa, torch.zeros_like(low_g.B), 1.0)
    assert_close(lora_gated_forward(g, u, zero, zero, "swiglu"), swiglu_reference(g, u))


def test_strided_views_of_fused_gate_up():
    # Phi-3: g/u are the two halves of one [N, 2I] output and share one xa; B is split by rows.
    gen = torch.Generator().manual_seed(3)
    gu = _randn(gen, 11, 2 * 48)
    xa_cat = _randn(gen, 11, 2 * 8)  # xa is a column slice of the q/k/v-style concatenated [N, sum r]
    xa = xa_cat[:, 8:]
    b = _randn(gen, 2 * 48, 8, scale=0.3)
    g, u = gu[:, :48], gu[:, 48:]
    low_g, low_u = LowRank(xa, b[:48], 1.5), LowRank(xa, b[48:], 1.5)
    dh = _randn(gen, 11, 48)
    assert_close(lora_gated_forward(g, u, low_g, low_u, "swiglu"), lora_gated_reference(g, u, low_g, low_u, "swiglu"))
    want = _autograd_reference(g, u, dh, low_g, low_u, "swiglu")
    lora_gated_backward(dh, g, u, g, u, low_g, low_u, "swiglu")
    assert_close(g, want[0])
    assert_close(u, want[1])


def test_rejects_factors_without_unit_column_stride():
    g, u, _, low_g, _ = _case(4, 20, 4, torch.float32)
    bad = LowRank(low_g.xa.t().contiguous().t(), low_g.B, 1.0)
    with pytest.raises(ValueError, match="unit column stride"):
        lora_gated_forward(g, u, bad, None, "swiglu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_shape_on_gpu(dtype):
    g, u, dh, low_g, low_u = _case(2048, 14336, 32, dtype)
    assert_close(lora_gated_forward(g, u, low_g, low_u, "swiglu"), lora_gated_reference(g, u, low_g, low_u, "swiglu"),
                 dtype)
    gen = torch.Generator().manual_seed(9)
    low_dh = LowRank(_randn(gen, 2048, 32, dtype=dtype), _randn(gen, 32, 14336, scale=0.3, dtype=dtype).t(), 1.0)
    want = _autograd_reference(g, u, dh.float() + low_dh.dense(), low_g, low_u, "swiglu")
    lora_gated_backward(dh, g, u, g, u, low_g, low_u, "swiglu", low_dh=low_dh)
    assert_close(g, want[0].to(dtype), dtype)
    assert_close(u, want[1].to(dtype), dtype)


def test_small_tiles_cover_ragged_edges():
    # The GPU's 16 x 128 tiles, scaled down: 70 rows and 50 columns leave partial tiles both ways.
    g, u, dh, low_g, low_u = _case(70, 50, 8, torch.float32, seed=5)
    tile = (16, 32, 4)
    assert_close(lora_gated_forward(g, u, low_g, low_u, "swiglu", tile),
                 lora_gated_reference(g, u, low_g, low_u, "swiglu"))
    want = _autograd_reference(g, u, dh, low_g, low_u, "swiglu")
    lora_gated_backward(dh, g, u, g, u, low_g, low_u, "swiglu", tile)
    assert_close(g, want[0])
    assert_close(u, want[1])
