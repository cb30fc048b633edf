"""Vision towers' packed attention (pronghorn.nn.vision_attention): one call per layer gives what transformers'
per-block split gives, on CPU (per-block sdpa fallback) and on CUDA (torch's varlen flash kernel)."""
import pytest
import torch
import torch.nn.functional as F

from pronghorn.nn.attention import varlen_flash_kernel
from pronghorn.nn.vision_attention import (
    VISION_VARLEN,
    route_vision_attention,
    vision_varlen_attention,
)
from tests.tolerances import assert_close

LENGTHS = [64, 1, 37, 64, 130]


def _per_block(q, k, v, lengths):
    """transformers' non-flash path: split the stream at the block boundaries, one sdpa call per block."""
    splits = [torch.split(t, lengths, dim=2) for t in (q, k, v)]
    out = [F.scaled_dot_product_attention(a, b, c).transpose(1, 2) for a, b, c in zip(*splits)]
    return torch.cat(out, dim=1)


def _inputs(device, dtype, heads=4, dim=80):
    torch.manual_seed(0)
    total = sum(LENGTHS)
    # Non-contiguous, like the tower's q/k/v (a transposed view of the fused qkv projection).
    qkv = torch.randn(total, 3, heads, dim, device=device, dtype=dtype)
    q, k, v = (t.transpose(0, 1).unsqueeze(0).requires_grad_() for t in qkv.unbind(1))
    cu = torch.tensor([0] + LENGTHS, device=device).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _check(device, dtype, grad_scale=1.0):
    q, k, v, cu = _inputs(device, dtype)
    got, _ = vision_varlen_attention(None, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                     max_length_q=max(LENGTHS), max_length_k=max(LENGTHS), is_causal=False)
    want = _per_block(q, k, v, LENGTHS)
    assert got.shape == want.shape == (1, sum(LENGTHS), q.shape[1], q.shape[-1])
    assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert_close(a, b, scale=grad_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_attention_matches_per_block_split_cpu(dtype):
    _check("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_attention_matches_per_block_split_cuda(dtype):
    if not torch.cuda.is_available() or varlen_flash_kernel() is None:
        pytest.skip("needs CUDA and torch.nn.attention.varlen")
    _check("cuda", dtype, grad_scale=2.0)  # flash and sdpa accumulate the backward in different orders


def test_without_block_boundaries_it_is_plain_bidirectional_sdpa():
    q, k, v, _ = _inputs("cpu", torch.float32)
    got, _ = vision_varlen_attention(None, q, k, v, None, is_causal=False)
    assert_close(got, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))


def test_routing_leaves_an_explicit_choice_alone():
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config._attn_implementation_internal = "eager"
    assert route_vision_attention(config) == "eager" and config._attn_implementation == "eager"
    config._attn_implementation_internal = "sdpa"
    assert route_vision_attention(config) == "sdpa" and config._attn_implementation == VISION_VARLEN
