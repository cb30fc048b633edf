"""The CUDA varlen path of pronghorn's padding-free attention against per-sequence sdpa (GPU only)."""
import pytest
import torch
import torch.nn.functional as F

from pronghorn.nn.attention import (
    _window_mask,
    varlen_flash_kernel,
    varlen_sdpa_attention,
)
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu


def _per_sequence(q, k, v, lengths, window):
    pieces, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        mask = _window_mask(n, window, q.device) if window is not None and n > window else None
        pieces.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], attn_mask=mask,
                                                     is_causal=mask is None, enable_gqa=True))
        start += n
    return torch.cat(pieces, dim=2).transpose(1, 2)


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_varlen_matches_per_sequence_sdpa(window, dtype):
    if not torch.cuda.is_available() or varlen_flash_kernel() is None:
        pytest.skip("needs CUDA and torch.nn.attention.varlen")
    torch.manual_seed(0)
    lengths = [1, 37, 300, 5, 170]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    q = torch.randn(1, heads, total, dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=dtype, requires_grad=True)
    got, _ = varlen_sdpa_attention(None, q, k, v, None, position_ids=position_ids, sliding_window=window)
    want = _per_sequence(q, k, v, lengths, window)
    assert got.shape == want.shape
    assert_close(got, want)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (q, k, v), g)
    grads_ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, scale=2.0)  # flash and sdpa accumulate the backward in different orders
