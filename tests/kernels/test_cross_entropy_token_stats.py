"""Token statistics of the fused LM-head cross-entropy (label tokens, top-1 correct, summed entropy):
the kernel's first pass against the PyTorch reference, ties, and that asking for them changes no loss."""
import pytest
import torch

import pronghorn.kernels.cross_entropy.function as ce_function
import pronghorn.kernels.cross_entropy.reference as ce_reference
from pronghorn.kernels.cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    token_stats_from_logits,
)
from tests.kernels.test_cross_entropy import DEVICE, _inputs, _run
from tests.tolerances import assert_close


def _stats(fn, hidden, weight, bias, labels, **kw):
    out = torch.zeros(3, device=DEVICE)
    fn(hidden, weight, labels, bias, token_stats_out=out, **kw)
    return out


def _assert_stats_close(got, want, dtype, n_rows):
    # Counts are exact; the entropy sum is compared per token, at the dtype's tolerance.
    assert got[0].item() == want[0].item()
    assert got[1].item() == want[1].item(), (got, want)
    assert_close(got[2:] / n_rows, want[2:] / n_rows, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"softcap": 3.0, "logit_scale": 0.5}, {"chunk_size": 7}],
                         ids=["plain", "scale_softcap", "chunks"])
def test_kernel_stats_match_reference(dtype, kw):
    # 600 columns: several steps of the kernel's column loop on CPU (256 wide), so the online
    # entropy sum and argmax cross step boundaries.
    hidden, weight, bias, labels = _inputs(19, 16, 600, dtype, bias=True, ignore=(0, 5, 6))
    # Make about half the labels the argmax, so the correct count is neither 0 nor all.
    logits = (hidden.float() @ weight.float().t() + bias.float())
    labels[::2] = logits.argmax(-1)[::2]
    labels[[0, 5, 6]] = -100
    got = _stats(fused_linear_cross_entropy, hidden, weight, bias, labels, **kw)
    want = _stats(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, **kw)
    assert got[0].item() == 16
    assert 0 < got[1].item() < 16
    _assert_stats_close(got, want, dtype, 16)


def test_asking_for_stats_changes_neither_loss_nor_gradients():
    hidden, weight, bias, labels = _inputs(9, 8, 300, torch.float32, bias=True, ignore=(2,))
    plain = _run(fused_linear_cross_entropy, hidden, weight, bias, labels, softcap=5.0)
    out = torch.zeros(3, device=DEVICE)
    with_stats = _run(fused_linear_cross_entropy, hidden, weight, bias, labels, softcap=5.0, token_stats_out=out)
    assert torch.equal(plain[0], with_stats[0])
    for a, b in zip(plain[1], with_stats[1]):
        assert torch.equal(a, b)
    assert out[0].item() == 8


def test_ties_go_to_the_lowest_index():
    # Columns 3 and 400 share one weight row that dominates every other logit: column 3 is the argmax
    # (first index, as torch.argmax), 400 is not, even though its logit is equal. 400 sits in a later
    # step of the kernel's column loop than 3.
    hidden = torch.ones(4, 8, device=DEVICE)
    weight = torch.zeros(512, 8, device=DEVICE)
    weight[3] = weight[400] = 1.0
    labels = torch.tensor([3, 400, 3, 7], device=DEVICE)
    got = _stats(fused_linear_cross_entropy, hidden, weight, None, labels)
    want = _stats(fused_linear_cross_entropy_reference, hidden, weight, None, labels)
    assert got[1].item() == want[1].item() == 2
    _assert_stats_close(got, want, torch.float32, 4)


def test_stats_add_up_across_calls_and_ignore_masked_rows():
    hidden, weight, _, labels = _inputs(6, 8, 131, torch.float32, ignore=(1, 2, 3, 4, 5))
    out = torch.zeros(3, device=DEVICE)
    fused_linear_cross_entropy(hidden, weight, labels, token_stats_out=out)
    fused_linear_cross_entropy(hidden, weight, labels, token_stats_out=out)
    one = token_stats_from_logits(hidden[:1] @ weight.t(), labels[:1])
    assert_close(out, 2 * one)
    all_ignored = torch.full_like(labels, -100)
    empty = torch.zeros(3, device=DEVICE)
    fused_linear_cross_entropy(hidden, weight, all_ignored, token_stats_out=empty)
    assert torch.equal(empty, torch.zeros(3, device=DEVICE))


def test_fallback_without_triton_gives_the_reference_stats(monkeypatch):
    hidden, weight, _, labels = _inputs(7, 8, 131, torch.float32, ignore=(3,))
    want = _stats(fused_linear_cross_entropy_reference, hidden, weight, None, labels, softcap=2.0)
    monkeypatch.setattr(ce_function, "use_triton", lambda *t: False)
    got = _stats(fused_linear_cross_entropy, hidden, weight, None, labels, softcap=2.0)
    assert torch.equal(got, want)


def test_reference_stats_by_hand_and_in_row_slices(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 33, generator=gen) * 3
    labels = torch.randint(0, 33, (10,), generator=gen)
    labels[:4] = logits[:4].argmax(-1)
    labels[9] = -100
    probs = logits[:9].softmax(-1)
    entropy = -(probs * probs.log()).sum()
    correct = (logits[:9].argmax(-1) == labels[:9]).sum()
    want = torch.stack([torch.tensor(9.0), correct.float(), entropy])
    assert_close(token_stats_from_logits(logits, labels), want)
    monkeypatch.setattr(ce_reference, "_STATS_ROWS", 3)  # the row slices must add up to the same
    assert_close(token_stats_from_logits(logits, labels), want)


def test_bad_stats_buffer_is_an_error():
    hidden, weight, _, labels = _inputs(3, 8, 131, torch.float32)
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(4), torch.zeros(1, 3)):
        with pytest.raises(ValueError, match="token_stats_out must be a float32 tensor of shape"):
            fused_linear_cross_entropy(hidden, weight, labels, token_stats_out=bad.to(DEVICE))


def test_gpu_launch_config_under_interpreter(monkeypatch):
    # One row per program, as on the GPU, with a narrow column step so the loop runs several times.
    import pronghorn.kernels.cross_entropy.triton as ce_triton

    monkeypatch.setattr(ce_triton, "ce_tile_config", lambda n_cols, on_gpu: (1, 64))
    hidden, weight, bias, labels = _inputs(5, 8, 131, torch.float32, bias=True, ignore=(1,))
    labels[0] = (hidden[0] @ weight.t() + bias).argmax()
    got = _stats(fused_linear_cross_entropy, hidden, weight, bias, labels, softcap=3.0, chunk_size=3)
    want = _stats(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, softcap=3.0)
    _assert_stats_close(got, want, torch.float32, 4)


@pytest.mark.gpu
def test_gpu_llama3_vocab_bf16():
    hidden, weight, _, labels = _inputs(2048, 4096, 128256, torch.bfloat16, ignore=range(0, 2048, 7))
    labels[1::3] = (hidden[1::3] @ weight.t()).argmax(-1)
    got = _stats(fused_linear_cross_entropy, hidden, weight, None, labels, softcap=30.0)
    want = _stats(fused_linear_cross_entropy_reference, hidden, weight, None, labels, softcap=30.0)
    # bf16 logits from two different matmul kernels can flip near-ties of the argmax.
    assert got[0].item() == want[0].item()
    assert abs(got[1].item() - want[1].item()) <= 4, (got, want)
    assert_close(got[2:] / got[0], want[2:] / want[0], torch.bfloat16)


def test_lm_head_loss_collects_stats_only_inside_the_block():
    from pronghorn.nn.lm_head_loss import LMHeadLossSpec, collect_token_stats, lm_head_loss

    head = torch.nn.Linear(8, 131, bias=True).to(DEVICE)
    hidden = torch.randn(2, 6, 8, device=DEVICE)
    labels = torch.randint(0, 131, (2, 6), device=DEVICE)
    labels[0, :3] = -100
    spec = LMHeadLossSpec(softcap=5.0, logit_scale=0.7)
    logits = head(hidden)[:, :-1].reshape(-1, 131)
    want = token_stats_from_logits(logits, labels[:, 1:].reshape(-1), softcap=5.0, logit_scale=0.7)
    with collect_token_stats() as fused:
        loss = lm_head_loss(hidden, head, labels, spec=spec)
        lm_head_loss(hidden, head, labels, spec=spec)  # a second call in the block adds to the first
    assert "Fused" in type(loss.grad_fn).__name__
    _assert_stats_close(fused.sums, 2 * want, torch.float32, 2 * want[0])
    head.register_forward_hook(lambda m, i, o: None)  # wrapped heads take the logits path
    with collect_token_stats() as unfused:
        lm_head_loss(hidden, head, labels, spec=spec)
    _assert_stats_close(unfused.sums, want, torch.float32, want[0])
    with collect_token_stats() as closed:
        lm_head_loss(hidden, head, labels, spec=spec)
    lm_head_loss(hidden, head, labels, spec=spec)  # after the block: measured by nobody
    _assert_stats_close(closed.sums, want, torch.float32, want[0])
