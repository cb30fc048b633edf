"""NF4 dequantization: Triton kernel and PyTorch reference against each other, hand-packed data,
and bitsandbytes' own dequantize_4bit (which runs on CPU in bitsandbytes >= 0.45)."""
import math

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_f  # noqa: E402

from pronghorn.kernels.dequant import (  # noqa: E402
    NF4_VALUES, dense_weight, dequantize_nf4, dequantize_nf4_reference, is_quantized, weight_of,
)
from pronghorn.kernels.dequant.function import dequantize_nf4_part  # noqa: E402
from pronghorn.kernels.dequant.reference import dequantize_nf4_part_reference  # noqa: E402
from pronghorn.kernels.dequant.weights import dense_part  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantize(shape, blocksize, nested, dtype, seed=0, device="cpu", storage=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.7).to(device=device, dtype=dtype)
    return bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested,
                               quant_storage=storage)


def test_table_matches_bitsandbytes():
    ours = torch.tensor(NF4_VALUES, dtype=torch.float32)
    assert torch.equal(ours, bnb_f.get_4bit_type("nf4", device="cpu").float())


def test_reference_on_hand_packed_bytes():
    """Codes 0..15 packed by hand: byte i holds element 2i (high nibble) and 2i+1 (low nibble)."""
    from bitsandbytes.functional import QuantState

    codes = [15, 0, 7, 8, 1, 14, 3, 12, 5]  # 9 elements: the last byte's low nibble is padding
    packed = torch.tensor([(codes[i] << 4) | (codes[i + 1] if i + 1 < len(codes) else 0)
                           for i in range(0, len(codes), 2)], dtype=torch.uint8).reshape(-1, 1)
    absmax = torch.tensor([2.0, 0.5, 4.0])  # blocksize 4 -> blocks [0:4], [4:8], [8:9]
    state = QuantState(absmax=absmax, shape=torch.Size([9]), code=None, blocksize=4,
                       quant_type="nf4", dtype=torch.float32)
    expected = torch.tensor([NF4_VALUES[c] * float(absmax[i // 4]) for i, c in enumerate(codes)])
    got = dequantize_nf4_reference(packed, state)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert torch.equal(dequantize_nf4(packed, state), got)


@pytest.mark.parametrize("shape", [(33, 65), (64, 128), (7,), (3, 5, 9)])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_bit_exact(shape, blocksize, nested, dtype):
    packed, state = _quantize(shape, blocksize, nested, dtype)
    ref = dequantize_nf4_reference(packed, state)
    out = dequantize_nf4(packed, state)
    assert out.shape == tuple(shape) and out.dtype == dtype
    assert torch.equal(out, ref)


# bitsandbytes' CPU path for an odd last dimension goes through torch.compile (slow on 2 cores), so the
# full grid uses even shapes and one odd shape. Its native CPU kernel also blocks each ROW separately,
# which disagrees with its own (flat) quantize_4bit and CUDA kernel when a row is not a whole number of
# blocks (e.g. 48x96 with blocksize 64): CPU comparisons use row lengths that are multiples of the
# blocksize; test_blocks_run_across_rows and the GPU test cover the other case.
@pytest.mark.parametrize("shape,dtypes", [((64, 128), DTYPES), ((40, 256), DTYPES), ((33, 65), [torch.float32])])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
def test_matches_bitsandbytes_bit_exact(shape, dtypes, blocksize, nested):
    for dtype in dtypes:
        packed, state = _quantize(shape, blocksize, nested, dtype, seed=1)
        expected = bnb_f.dequantize_4bit(packed, state)
        assert torch.equal(dequantize_nf4(packed, state), expected), dtype
        assert torch.equal(dequantize_nf4_reference(packed, state), expected), dtype


@pytest.mark.parametrize("nested", [False, True])
def test_blocks_run_across_rows(nested):
    """Blocks are taken over the flattened weight: every value is within half an NF4 gap of the original."""
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    out = dequantize_nf4(packed, state)
    scale = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    half_gap = max(b - a for a, b in zip(NF4_VALUES, NF4_VALUES[1:])) / 2
    err = (out - w).reshape(-1, 64).abs()
    # double quantization perturbs each block's scale by up to ~1%, hence the slack on the bound
    assert bool((err <= scale * (half_gap * 1.01) + 1e-3 * scale).all())


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_out_dtype_override(out_dtype):
    packed, state = _quantize((16, 64), 64, True, torch.float32)
    full = dequantize_nf4_reference(packed, state, torch.float32)
    out = dequantize_nf4(packed, state, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, full.to(out_dtype))  # one rounding from the float32 product


def test_quant_storage_other_than_uint8():
    packed, state = _quantize((32, 64), 64, True, torch.bfloat16, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(packed, state), bnb_f.dequantize_4bit(packed, state))


def test_rejects_fp4_and_wrong_sizes():
    w = torch.randn(8, 64)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        dequantize_nf4(packed, state)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="bytes"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        dequantize_nf4(packed, state, torch.int8)


def _linear4bit(weight, nested=True, quant_dtype=torch.float32):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, quant_type="nf4",
                              compress_statistics=nested, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(weight.to(quant_dtype), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested)
    return layer.to("cpu")  # moving to a device is what quantizes a Params4bit


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_of_linear4bit(dtype):
    layer = _linear4bit(torch.randn(33, 64))
    assert is_quantized(layer.weight)
    expected = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    assert torch.equal(weight_of(layer, dtype), expected)


def test_dense_weight_matches_bnb_double_rounding():
    """A float16 quant state read as bfloat16 goes through float16 first, as bitsandbytes' matmul does."""
    layer = _linear4bit(torch.randn(32, 128), quant_dtype=torch.float16)
    expected = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(dense_weight(layer.weight, torch.bfloat16), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_of_linear8bit(dtype):
    w = torch.randn(24, 40)
    layer = bnb.nn.Linear8bitLt(40, 24, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.int8 and is_quantized(layer.weight)
    expected = bnb_f.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB).to(dtype)
    got = weight_of(layer, dtype)
    assert torch.equal(got, expected)
    # int8 rows carry ~1/254 relative error of each row's absmax
    torch.testing.assert_close(got.float(), w, atol=w.abs().amax() / 127, rtol=0)


def test_weight_of_plain_linear_and_errors():
    lin = nn.Linear(8, 4)
    assert weight_of(lin, torch.float32) is lin.weight
    assert torch.equal(weight_of(lin, torch.bfloat16), lin.weight.detach().to(torch.bfloat16))
    assert not is_quantized(lin.weight)
    with pytest.raises(TypeError, match="nn.Linear"):
        weight_of(nn.Conv1d(2, 2, 1), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1023, 4097), (48, 96), (14336, 4096)])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_bitsandbytes(shape, nested, dtype):
    packed, state = _quantize(shape, 64, nested, dtype, device="cuda")
    expected = bnb_f.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(packed, state), expected)
    assert math.prod(shape) == expected.numel()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("nested", [False, True])
def test_gpu_relaunches_through_the_compiled_launcher_bit_exactly(nested):
    # The first call goes through Triton's JIT, later ones through the kept launcher (compiled_launch.py).
    packed, state = _quantize((1023, 4097), 64, nested, torch.bfloat16, device="cuda")
    expected = bnb_f.dequantize_4bit(packed, state)
    outs = [dequantize_nf4(packed, state) for _ in range(3)]
    launch = state._pronghorn_nf4_plan.launches[torch.bfloat16]
    assert launch.runner is not None and not launch.jit_only
    for out in outs:
        assert torch.equal(out, expected)
    other = dequantize_nf4(packed, state, torch.float32)  # another output dtype: its own compiled kernel
    assert torch.equal(other, dequantize_nf4_reference(packed, state, torch.float32))


def test_cached_launch_plan_follows_a_moved_state():
    """The Triton path keeps a per-weight launch plan; a state whose tensors are replaced gets a new one."""
    packed, state = _quantize((32, 64), 64, False, torch.float32, seed=3)
    first = dequantize_nf4(packed, state)
    state.absmax = state.absmax * 2  # a new buffer, as QuantState.to(device) makes
    second = dequantize_nf4(packed, state)
    assert torch.equal(second, dequantize_nf4_reference(packed, state))
    torch.testing.assert_close(second, first * 2, atol=0, rtol=0)
    # a malformed state is still rejected when the plan is rebuilt
    state.absmax = state.absmax[:-1].clone()
    with pytest.raises(ValueError, match="absmax"):
        dequantize_nf4(packed, state)


# A part of an odd-width weight starts on an odd element: its first code is a low nibble, and its blocks
# straddle rows.
@pytest.mark.parametrize("shape,rows,cols", [((33, 65), (3, 20), (0, 65)), ((33, 65), (0, 33), (7, 40)),
                                             ((64, 128), (40, 64), (64, 128)), ((9, 7), (5, 5), (0, 7)),
                                             ((9, 7), (8, 9), (3, 4))])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parts_are_the_parts_of_the_whole_weight(shape, rows, cols, nested, dtype):
    packed, state = _quantize(shape, 64, nested, dtype)
    rows, cols = slice(*rows), slice(*cols)
    want = dequantize_nf4_reference(packed, state)[rows, cols]
    assert torch.equal(dequantize_nf4_part_reference(packed, state, rows, cols), want)
    size = want.numel()
    buffer = torch.full((2 * size + 2,), float("nan"), dtype=dtype)
    out = buffer[1:1 + size].view(want.shape)
    got = dequantize_nf4_part(packed, state, rows, cols, dtype, out=out)
    assert got is out and torch.equal(got, want)
    assert buffer[0].isnan() and buffer[1 + size:].isnan().all()  # nothing written outside out
    assert torch.equal(dequantize_nf4_part(packed, state, rows, cols), want)


def test_whole_rows_and_float_weights_through_dense_part():
    packed, state = _quantize((16, 64), 64, True, torch.bfloat16)
    whole = dequantize_nf4_reference(packed, state)
    weight = bnb.nn.Params4bit(data=packed, requires_grad=False, quant_state=state, quant_type="nf4")
    assert torch.equal(dense_part(weight, torch.bfloat16, slice(4, 9)), whole[4:9])
    assert torch.equal(dense_part(weight, torch.float32, slice(4, 9), slice(1, 3)), whole[4:9, 1:3].float())
    plain = torch.randn(6, 8)
    view = dense_part(plain, torch.float32, slice(1, 4), slice(2, 5))
    assert view.data_ptr() == plain[1, 2].data_ptr()  # no copy of a weight already in the dtype
    assert torch.equal(dense_part(plain, torch.bfloat16, slice(0, 2)), plain[:2].bfloat16())


def test_part_errors_name_the_range_and_the_expected_out():
    packed, state = _quantize((8, 64), 64, False, torch.float32)
    with pytest.raises(ValueError, match=r"row range 3:9:None must have unit steps and lie within the weight's 8 rows"):
        dequantize_nf4_part(packed, state, slice(3, 9))
    with pytest.raises(ValueError, match=r"column range 0:64:2"):
        dequantize_nf4_part(packed, state, slice(0, 2), slice(0, 64, 2))
    with pytest.raises(ValueError, match=r"contiguous torch.float32 tensor of shape \(2, 64\)"):
        dequantize_nf4_part(packed, state, slice(0, 2), out=torch.empty(2, 32))
    with pytest.raises(ValueError, match="non-contiguous"):
        dequantize_nf4_part(packed, state, slice(0, 2), out=torch.empty(64, 2).t())
    flat_packed, flat_state = _quantize((64,), 64, False, torch.float32)
    with pytest.raises(ValueError, match=r"2-D weight, quant_state.shape is \(64,\)"):
        dequantize_nf4_part(flat_packed, flat_state, slice(0, 1))
