"""RMSNorm kernel parity: Triton (interpreter on CPU) against the PyTorch reference and Hugging Face."""
import math

import pytest
import torch

import pronghorn.kernels.rms_norm.function as rms_fn
from pronghorn.kernels import norm_rows
from pronghorn.kernels.rms_norm import rms_norm
from pronghorn.kernels.rms_norm.reference import rms_norm_reference
from pronghorn.nn.norms import rms_norm_forward
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = [("llama", 0.0), ("gemma", 1.0)]


def _grads(fn, x, w, g):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    return y, dx, dw


def _check(x, w, offset, mode, eps=1e-6, scale=1.0, dw_atol=None):
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    y, dx, dw = _grads(lambda a, b: rms_norm(a, b, eps, offset, mode), x, w, g)
    yr, dxr, dwr = _grads(lambda a, b: rms_norm_reference(a, b, eps, offset, mode), x, w, g)
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert_close(y, yr, msg="forward")
    # Backward: the kernel accumulates in fp32 where the reference rounds each product to the
    # low-precision dtype, so the reference itself carries about one extra rounding of error.
    assert_close(dx, dxr, scale=scale, msg="dx")
    if dw_atol is None:
        assert_close(dw, dwr, scale=scale, msg="dw")
    else:
        torch.testing.assert_close(dw.float(), dwr.float(), atol=dw_atol, rtol=0.0, msg="dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("hidden", [1, 3, 127])
def test_matches_reference(dtype, mode, offset, hidden):
    torch.manual_seed(hidden)
    x = torch.randn(2, 5, hidden, dtype=dtype)
    w = torch.randn(hidden, dtype=dtype)
    # dw sums 10 rows of products rounded to the dtype in the reference: allow 2x for fp16/bf16.
    _check(x, w, offset, mode, scale=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 4, 48).transpose(0, 1),  # rows not in memory order, last dim unit-stride
        lambda: torch.randn(4, 6, 96)[..., 10:58],  # slice: row stride 96, not 48
        lambda: torch.randn(4, 48, 6).transpose(1, 2),  # last dim strided: copied to rows first
    ],
    ids=["transposed-rows", "sliced-cols", "strided-last-dim"],
)
def test_non_contiguous_input(mode, offset, make):
    torch.manual_seed(0)
    x = make()
    assert not x.is_contiguous()
    _check(x, torch.randn(48), offset, mode)


def test_gemma_offset_uses_one_plus_weight():
    torch.manual_seed(1)
    x, w = torch.randn(3, 16), torch.randn(16)
    plain = rms_norm(x, w + 1.0, 1e-6, 0.0, "gemma")
    assert_close(rms_norm(x, w, 1e-6, 1.0, "gemma"), plain)


def test_fp32_weight_with_bf16_input_promotes_like_llama():
    torch.manual_seed(2)
    x, w = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(32, dtype=torch.float32)
    y = rms_norm(x, w, 1e-5, 0.0, "llama")
    assert y.dtype == torch.float32
    # The product is fp32 but the normalised activations were rounded to bf16 first, so they carry
    # bf16 error (and Triton's CPU interpreter truncates fp32->bf16 where GPUs round to nearest).
    assert_close(y, rms_norm_reference(x, w, 1e-5, 0.0, "llama"), dtype=torch.bfloat16)
    assert rms_norm(x, w, 1e-5, 1.0, "gemma").dtype == torch.bfloat16


def test_in_place_backward_reuses_gradient_buffer():
    torch.manual_seed(3)
    x = torch.randn(4, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    g = torch.randn(4, 24)
    expected = torch.autograd.grad(rms_norm_reference(x, w), (x, w), g.clone())
    dx, dw = torch.autograd.grad(rms_norm(x, w, in_place_backward=True), (x, w), g)
    assert dx.data_ptr() == g.data_ptr()
    assert_close(dx, expected[0])
    assert_close(dw, expected[1])
    # An expanded (stride-0) gradient must not be written into.
    x.grad = None
    rms_norm(x, w, in_place_backward=True).sum().backward()
    ref = torch.autograd.grad(rms_norm_reference(x, w).sum(), x)[0]
    assert_close(x.grad, ref)


def test_frozen_weight_gets_no_gradient():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8)
    rms_norm(x, w).sum().backward()
    assert w.grad is None and x.grad is not None


def test_int64_specialisation_matches(monkeypatch):
    # Real >2^31-element tensors do not fit a CPU test; force the int64 code path instead.
    monkeypatch.setattr(norm_rows, "offsets_need_int64", lambda *t: True)
    torch.manual_seed(4)
    _check(torch.randn(5, 33), torch.randn(33), 0.0, "llama")


def test_int64_flag_follows_strided_extent_not_just_element_count():
    # Meta tensors carry shapes and strides without memory: a narrow slice of a huge row stride.
    sliced = torch.empty(2, 2**31, device="meta")[:, :4]
    assert sliced.numel() == 8 and norm_rows.offsets_need_int64(sliced)
    assert not norm_rows.offsets_need_int64(torch.empty(2, 4, device="meta"))


def test_reference_fallback_when_triton_unavailable(monkeypatch):
    monkeypatch.setattr(rms_fn, "use_triton", lambda *t: False)

    def fail(*args):
        raise AssertionError("the Triton path ran although use_triton is False")

    monkeypatch.setattr(rms_fn.RMSNormFunction, "apply", fail)
    x, w = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, 1.0, "gemma"), rms_norm_reference(x, w, 1e-6, 1.0, "gemma"))


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="cast_mode"):
        rms_norm(torch.randn(2, 4), torch.randn(4), cast_mode="t5")
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(2, 4), torch.randn(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_nn_wrapper_matches_transformers_modules(dtype, family):
    if family == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
        offset = 0.0
    else:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as Norm
        offset = 1.0
    torch.manual_seed(5)
    hf = Norm(40, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(40))
    x = torch.randn(2, 3, 40, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 40, dtype=dtype)
    expected = hf(x)
    dx_ref, dw_ref = torch.autograd.grad(expected, (x, hf.weight), g)
    got = rms_norm_forward(hf, x, offset=offset, cast_mode=family)
    dx, dw = torch.autograd.grad(got, (x, hf.weight), g)
    assert got.dtype == expected.dtype
    assert_close(got, expected)
    scale = 1.0 if dtype == torch.float32 else 2.0  # fp32 accumulation vs the module's bf16 products
    assert_close(dx, dx_ref, scale=scale)
    assert_close(dw, dw_ref, scale=scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode,offset", MODES)
@pytest.mark.parametrize("shape", [(4, 1024, 4096), (3, 77, 5120), (2048, 8192)])
def test_gpu_large_shapes(dtype, mode, offset, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device="cuda")
    w = torch.randn(shape[-1], dtype=dtype, device="cuda")
    # dw sums thousands of rows, in another order and without the reference rounding each product to the
    # dtype: the two differ by a random walk of per-product roundings (~sqrt(rows) * eps(dtype) for terms
    # of size ~1) plus fp32 summation-order error on partial sums that grow to ~sqrt(rows) (~rows * eps32).
    rows = x.numel() // shape[-1]
    dw_atol = 6 * (math.sqrt(rows) * torch.finfo(dtype).eps + rows * torch.finfo(torch.float32).eps)
    _check(x, w, offset, mode, scale=10.0 if dtype == torch.float32 else 4.0, dw_atol=dw_atol)


@pytest.mark.gpu
def test_gpu_int64_sized_input():
    rows, hidden = (2**31 // 4096) + 2, 4096
    x = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    xg = x.requires_grad_(True)
    y = rms_norm(xg, w)
    tail = slice(rows - 3, rows)
    assert_close(y[tail], rms_norm_reference(x[tail], w))
    g = torch.ones_like(y)
    y.backward(g)
    x_tail = x[tail].detach().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(rms_norm_reference(x_tail, w.detach()), x_tail, g[tail])
    assert_close(xg.grad[tail], dx_ref)
