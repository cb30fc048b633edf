"""Fused LM-head cross-entropy parity against the unfused reference and Hugging Face's ForCausalLMLoss."""
import pytest
import torch

import pronghorn.kernels.cross_entropy.function as ce_function
from pronghorn.kernels.cross_entropy import (
    causal_lm_fused_loss,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    pick_chunk_rows,
    set_default_chunk_rows,
)
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(n, h, v, dtype, bias=False, seed=0, ignore=()):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) / max(h, 1) ** 0.5 * 2).to(DEVICE, dtype)
    b = torch.randn(v, generator=gen).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[list(ignore)] = -100
    return hidden, weight, b, labels.to(DEVICE)


def _run(fn, hidden, weight, bias, labels, **kw):
    """Loss and the gradients of every float input that requires one."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
    if fn is fused_linear_cross_entropy and DEVICE == "cpu":
        assert type(loss.grad_fn).__name__ == "FusedLinearCrossEntropyFunctionBackward"
    loss.backward()
    return loss.detach(), [t.grad for t in leaves if t is not None]


def _assert_grads_close(got, want, dtype):
    # Gradients carry a 1/num_tokens factor; compare them relative to their largest entry so the
    # absolute tolerance of the table is meaningful whatever that factor is.
    for a, b in zip(got, want):
        peak = b.float().abs().max().clamp(min=1e-12)
        assert_close(a.float() / peak, b.float() / peak, dtype)


def _check(dtype, hidden, weight, bias, labels, **kw):
    loss, grads = _run(fused_linear_cross_entropy, hidden, weight, bias, labels, **kw)
    ref_loss, ref_grads = _run(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, **kw)
    assert torch.isfinite(loss)
    assert_close(loss, ref_loss, dtype)
    _assert_grads_close(grads, ref_grads, dtype)
    return loss, grads


CASES = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 4.0, "bias": True},
    "scale_softcap": {"softcap": 3.0, "logit_scale": 0.5},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(dtype, case):
    kw = dict(CASES[case])
    hidden, weight, bias, labels = _inputs(19, 16, 300, dtype, bias=kw.pop("bias", False), ignore=(3, 11))
    _check(dtype, hidden, weight, bias, labels, chunk_size=8, **kw)


@pytest.mark.parametrize("n,h,v,chunk", [(1, 1, 131, None), (7, 1, 1000, 3), (1, 5, 2, 1), (5, 8, 131, 5),
                                         (9, 3, 257, 4)])
def test_odd_sizes(n, h, v, chunk):
    _check(torch.float32, *_inputs(n, h, v, torch.float32), chunk_size=chunk)


def test_logit_scale_alone():
    _check(torch.float32, *_inputs(6, 8, 131, torch.float32), logit_scale=3.0, chunk_size=4)


def test_non_contiguous_hidden():
    _, weight, _, labels = _inputs(10, 12, 131, torch.float32)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(10, 30, generator=gen).to(DEVICE)
    _check(torch.float32, wide[:, 3:15], weight, None, labels, chunk_size=4)  # row stride 30
    transposed = torch.randn(12, 10, generator=gen).to(DEVICE).t()  # column stride 10
    _check(torch.float32, transposed, weight, None, labels, chunk_size=4)


def test_ignored_rows_and_an_all_ignored_chunk():
    hidden, weight, _, labels = _inputs(12, 8, 131, torch.float32, ignore=(0, 4, 5, 6, 7, 11))
    _check(torch.float32, hidden, weight, None, labels, chunk_size=4)  # rows 4..7 form one chunk


def test_all_ignored_gives_zero_not_nan():
    hidden, weight, _, labels = _inputs(6, 8, 131, torch.float32, ignore=range(6))
    loss, grads = _run(fused_linear_cross_entropy, hidden, weight, None, labels, chunk_size=4)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_reduction_sum_and_unsupported_reduction():
    hidden, weight, _, labels = _inputs(9, 8, 131, torch.float32, ignore=(2,))
    _check(torch.float32, hidden, weight, None, labels, reduction="sum", chunk_size=4)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_with_num_items_sum_to_the_big_batch_mean(as_tensor):
    # Uneven label counts per micro-batch: the per-micro-batch mean would be wrong, the rule is not.
    hidden, weight, _, labels = _inputs(14, 8, 131, torch.float32, ignore=(0, 1, 2, 3, 9))
    big_loss, big_grads = _run(fused_linear_cross_entropy, hidden, weight, None, labels, chunk_size=4)
    total = int((labels != -100).sum())
    num_items = torch.tensor(total, device=DEVICE) if as_tensor else total
    w = weight.detach().clone().requires_grad_()
    xs = hidden.detach().clone().requires_grad_()
    summed = 0.0
    for rows in (slice(0, 6), slice(6, 14)):
        loss = fused_linear_cross_entropy(xs[rows], w, labels[rows], num_items_in_batch=num_items, chunk_size=4)
        loss.backward()
        summed = summed + loss.detach()
    torch.testing.assert_close(summed, big_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad, big_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, big_grads[1], atol=1e-5, rtol=1e-5)


def test_frozen_weight_or_frozen_hidden():
    hidden, weight, _, labels = _inputs(7, 8, 131, torch.float32)
    _, (ref_x, ref_w) = _run(fused_linear_cross_entropy_reference, hidden, weight, None, labels)
    x = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(x, weight, labels, chunk_size=4).backward()  # LoRA: lm_head frozen
    assert_close(x.grad, ref_x)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, labels, chunk_size=4).backward()
    assert_close(w.grad, ref_w)


def test_out_of_range_label_is_an_error():
    hidden, weight, _, labels = _inputs(4, 8, 131, torch.float32)
    labels[2] = 131
    with pytest.raises(IndexError, match="label 131 is outside"):
        fused_linear_cross_entropy(hidden, weight, labels)


@pytest.fixture
def synced_label_check(monkeypatch):
    """A fresh label check whose synchronous calls are all done, and CUDA inputs: ``(check, hidden, weight,
    labels)``."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pronghorn.kernels.cross_entropy import label_check

    check = label_check.LabelRangeCheck()
    monkeypatch.setattr(label_check, "check_label_range", check)
    monkeypatch.setattr("pronghorn.kernels.cross_entropy.function.check_label_range", check)
    hidden, weight, _, labels = _inputs(4, 8, 131, torch.float32)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    for _ in range(label_check.SYNC_CHECKS):
        fused_linear_cross_entropy(hidden, weight, labels)
    return check, hidden, weight, labels


@pytest.mark.gpu
def test_cuda_label_check_waits_only_in_the_first_calls_then_raises_at_the_next_call(synced_label_check):
    """After the first SYNC_CHECKS calls the range check is queued behind the step (no host sync) and the next
    call raises for it, naming the call whose labels were bad."""
    from pronghorn.kernels.cross_entropy.label_check import SYNC_CHECKS

    _, hidden, weight, labels = synced_label_check
    bad = labels.clone()
    bad[1] = 200
    fused_linear_cross_entropy(hidden, weight, bad)  # queued: no exception yet
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=f"label 200 is outside .*loss call {SYNC_CHECKS + 1}"):
        fused_linear_cross_entropy(hidden, weight, labels)
    fused_linear_cross_entropy(hidden, weight, labels)  # reported once, then forgotten


@pytest.mark.gpu
def test_cuda_label_check_pins_no_host_memory_after_its_synchronous_calls(synced_label_check):
    """The queued checks reuse pinned result buffers made during the synchronous calls: page-locking a new block
    mid-run stalled the host for tens of milliseconds."""
    from pronghorn.kernels.cross_entropy.label_check import PINNED_RESULTS

    if not hasattr(torch.cuda, "host_memory_stats"):
        pytest.skip("needs torch.cuda.host_memory_stats")
    check, hidden, weight, labels = synced_label_check
    before = torch.cuda.host_memory_stats().get("num_host_alloc", 0)
    for i in range(20):
        fused_linear_cross_entropy(hidden, weight, labels)
        if i % 2:
            torch.cuda.synchronize()  # some checks finish before the next call, some do not
    assert torch.cuda.host_memory_stats().get("num_host_alloc", 0) == before
    assert len(check._pending) <= PINNED_RESULTS


def test_second_backward_is_an_error():
    hidden, weight, _, labels = _inputs(4, 8, 131, torch.float32)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_grad_output_scales_gradients():
    hidden, weight, _, labels = _inputs(5, 8, 131, torch.float32)
    x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    (fused_linear_cross_entropy(x1, weight, labels) * 3.5).backward()
    fused_linear_cross_entropy_reference(x2, weight, labels).mul(3.5).backward()
    assert_close(x1.grad, x2.grad)


def test_autocast_casts_like_nn_linear():
    hidden, weight, _, labels = _inputs(6, 8, 131, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    want = fused_linear_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), labels)
    assert_close(loss, want, torch.bfloat16)


def test_fallback_without_triton(monkeypatch):
    hidden, weight, _, labels = _inputs(6, 8, 131, torch.float32)
    monkeypatch.setattr(ce_function, "use_triton", lambda *t: False)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, softcap=2.0)
    assert loss.grad_fn is not None and "Fused" not in type(loss.grad_fn).__name__
    assert_close(loss, fused_linear_cross_entropy_reference(hidden, weight, labels, softcap=2.0))


def test_chunk_size_choice(monkeypatch):
    assert pick_chunk_rows(100, 1000, torch.device("cpu")) == ce_function.CPU_CHUNK_ROWS
    assert pick_chunk_rows(100, 1000, torch.device("cpu"), chunk_size=7) == 7
    with pytest.raises(ValueError, match="chunk_size"):
        pick_chunk_rows(100, 1000, torch.device("cpu"), chunk_size=0)
    cuda = torch.device("cuda", 0)
    for free, vocab, want in [(80e9, 128256, 1024), (80e9, 32000, 4096), (1e9, 32000, 1024), (1e13, 1000, 65536)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (int(f), int(f)))
        # An fp32 [rows, vocab] buffer within 1/8 of free memory and 512 MiB, power of two in [1024, 65536].
        assert pick_chunk_rows(4096, vocab, cuda) == want


def _hf_causal_loss(hidden, weight, labels=None, shift_labels=None, num_items_in_batch=None, softcap=None):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = hidden @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items_in_batch,
                           shift_labels=shift_labels)


@pytest.mark.parametrize("mode", ["labels", "shift_labels", "num_items", "softcap"])
def test_causal_wrapper_matches_transformers(mode):
    gen = torch.Generator().manual_seed(3)
    batch, seq, h, v = 2, 7, 8, 131
    hidden = torch.randn(batch, seq, h, generator=gen).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(DEVICE)
    labels = torch.randint(0, v, (batch, seq), generator=gen).to(DEVICE)
    labels[0, :3] = -100  # prompt tokens
    kw = {}
    if mode == "shift_labels":  # packed rows: each sequence's last position has no target
        kw["shift_labels"] = torch.cat([labels[:, 1:], torch.full((batch, 1), -100, device=DEVICE)], 1)
        kw["shift_labels"][1, 3] = -100
    else:
        kw["labels"] = labels
    if mode == "num_items":
        kw["num_items_in_batch"] = torch.tensor(23, device=DEVICE)
    if mode == "softcap":
        kw["softcap"] = 2.0
    results = []
    for fn in (causal_lm_fused_loss, _hf_causal_loss):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(x, w, chunk_size=4, **kw) if fn is causal_lm_fused_loss else fn(x, w, **kw)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    for a, b in zip(*results):
        assert_close(a, b)


def test_causal_wrapper_needs_exactly_one_label_kind():
    hidden = torch.randn(1, 3, 4, device=DEVICE)
    weight = torch.randn(10, 4, device=DEVICE)
    labels = torch.zeros(1, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="exactly one"):
        causal_lm_fused_loss(hidden, weight)
    with pytest.raises(ValueError, match="exactly one"):
        causal_lm_fused_loss(hidden, weight, labels, labels)


@pytest.mark.gpu
def test_gpu_llama3_vocab_bf16():
    hidden, weight, _, labels = _inputs(4096, 4096, 128256, torch.bfloat16, ignore=range(0, 4096, 7))
    _check(torch.bfloat16, hidden, weight, None, labels)
    _check(torch.bfloat16, hidden, weight, None, labels, softcap=30.0, chunk_size=1000)


@pytest.mark.gpu
def test_gpu_chunk_past_int32_offsets():
    # One chunk of 17000 x 128256 logits has more than 2**31 elements; only the last rows carry
    # labels, so the reference can be run on just those rows.
    n, v = 17000, 128256
    hidden, weight, _, labels = _inputs(n, 64, v, torch.bfloat16)
    labels[: n - 8] = -100
    loss, (gx, gw) = _run(fused_linear_cross_entropy, hidden, weight, None, labels, chunk_size=n, reduction="sum")
    ref, (rx, rw) = _run(fused_linear_cross_entropy_reference, hidden[-8:], weight, None, labels[-8:],
                         reduction="sum")
    assert_close(loss, ref, torch.bfloat16)
    _assert_grads_close([gx[-8:], gw], [rx, rw], torch.bfloat16)
    assert torch.count_nonzero(gx[: n - 8]) == 0


def _model_loss_vs_lm_head_loss(family, **extra):
    from pronghorn.nn.lm_head_loss import lm_head_loss, lm_head_spec_from_config
    from tests.factories import tiny_model

    model = tiny_model(family).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=gen).to(DEVICE)
    labels = input_ids.clone()
    labels[:, :4] = -100
    want = model(input_ids=input_ids, labels=labels, **extra).loss
    hidden = model.model(input_ids=input_ids).last_hidden_state
    got = lm_head_loss(hidden, model.lm_head, labels, spec=lm_head_spec_from_config(model.config), **extra)
    assert_close(got, want)
    return model, hidden, labels


def test_lm_head_loss_matches_llama_model_loss():
    _model_loss_vs_lm_head_loss("llama")
    _model_loss_vs_lm_head_loss("llama", num_items_in_batch=torch.tensor(17))


def test_lm_head_loss_matches_gemma2_softcapped_model_loss():
    from pronghorn.nn.lm_head_loss import lm_head_spec_from_config
    from tests.factories import tiny_config

    assert lm_head_spec_from_config(tiny_config("gemma2")).softcap == 30.0
    _model_loss_vs_lm_head_loss("gemma2")


def test_lm_head_spec_reads_cohere_and_granite_scales():
    from transformers import CohereConfig, GraniteConfig

    from pronghorn.nn.lm_head_loss import LMHeadLossSpec, lm_head_spec_from_config

    assert lm_head_spec_from_config(CohereConfig(logit_scale=0.0625)) == LMHeadLossSpec(None, 0.0625)
    assert lm_head_spec_from_config(GraniteConfig(logits_scaling=8.0)) == LMHeadLossSpec(None, 0.125)


def test_lm_head_loss_falls_back_for_wrapped_heads():
    from pronghorn.nn.lm_head_loss import LMHeadLossSpec, lm_head_loss

    head = torch.nn.Linear(8, 131, bias=True).to(DEVICE)
    hidden = torch.randn(2, 5, 8, device=DEVICE)
    labels = torch.randint(0, 131, (2, 5), device=DEVICE)
    spec = LMHeadLossSpec(softcap=5.0, logit_scale=0.7)
    fused = lm_head_loss(hidden, head, labels, spec=spec)
    assert "Fused" in type(fused.grad_fn).__name__
    head.register_forward_hook(lambda m, i, o: None)  # a hooked head must run its own forward
    unfused = lm_head_loss(hidden, head, labels, spec=spec)
    assert "Fused" not in type(unfused.grad_fn).__name__
    assert_close(fused, unfused)


def test_gpu_launch_config_under_interpreter(monkeypatch):
    # The GPU takes one row per program; run that configuration here too (with a narrow step so
    # the column loop still runs several times).
    import pronghorn.kernels.cross_entropy.triton as ce_triton

    monkeypatch.setattr(ce_triton, "ce_tile_config", lambda n_cols, on_gpu: (1, 64))
    hidden, weight, bias, labels = _inputs(5, 8, 131, torch.float32, bias=True, ignore=(1,))
    _check(torch.float32, hidden, weight, bias, labels, softcap=3.0, chunk_size=3)


def test_a_default_chunk_size_applies_where_callers_pass_none():
    try:
        set_default_chunk_rows(64)
        assert pick_chunk_rows(100, 1000, torch.device("cpu")) == 64
        assert pick_chunk_rows(100, 1000, torch.device("cpu"), chunk_size=7) == 7
        with pytest.raises(ValueError, match="positive int"):
            set_default_chunk_rows(0)
    finally:
        set_default_chunk_rows(None)
    assert pick_chunk_rows(100, 1000, torch.device("cpu")) == ce_function.CPU_CHUNK_ROWS
