"""Gradient checkpointing policies give the gradients of no checkpointing, through transformers' hook."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pronghorn.memory import (
    checkpointing_mode,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    normalize_checkpointing_mode,
    offloaded_checkpoint,
)
from tests.factories import tiny_model
from tests.memory._util import assert_grads_close, trainable_grads

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build(setup: str, family: str = "llama"):
    model = tiny_model(family, num_hidden_layers=3)
    if setup == "lora":
        # Dropout > 0 so the recompute must replay the same random masks.
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(model, cfg)
    model.train()
    return model


def _step(model, seed=0):
    torch.manual_seed(123)
    ids = torch.randint(3, 500, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), trainable_grads(model)


def _count_hook_calls(model):
    """Wrap each layer's checkpoint function so the test sees transformers actually call it."""
    calls = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        inner = layer._gradient_checkpointing_func

        def counted(fn, *args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(fn, *args, **kwargs)

        layer._gradient_checkpointing_func = counted
    return calls


def _count_attention_runs(model):
    runs = []
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module.register_forward_hook(lambda *a: runs.append(1))
    return runs


def test_mode_aliases():
    assert normalize_checkpointing_mode(False) is False
    assert normalize_checkpointing_mode(True) == "gpu"
    assert normalize_checkpointing_mode("unsloth") == "offload"
    assert normalize_checkpointing_mode("OFFLOAD") == "offload"
    with pytest.raises(ValueError, match="not understood"):
        normalize_checkpointing_mode("sometimes")


@pytest.mark.parametrize("setup", ["lora", "full"])
@pytest.mark.parametrize("mode", ["gpu", "offload", "unsloth"])
def test_gradients_match_no_checkpointing(setup, mode):
    model = _build(setup)
    ref_loss, ref = _step(model)

    change = enable_gradient_checkpointing(model, mode)
    assert change.mode == normalize_checkpointing_mode(mode)
    assert len([n for n in change.layers if n.startswith("model.layers.")]) == 3
    assert checkpointing_mode(model) == change.mode
    calls = _count_hook_calls(model)
    runs = _count_attention_runs(model)
    loss, grads = _step(model)
    assert len(calls) == 3, "transformers did not route the layers through the checkpoint function"
    assert len(runs) == 6, "each layer should run once in forward and once in the backward recompute"
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads, ref)


def test_offload_matches_standard_checkpointing_and_disable_restores():
    model = _build("lora")
    enable_gradient_checkpointing(model, "gpu")
    _, gpu = _step(model, seed=5)
    enable_gradient_checkpointing(model, "offload")
    _, off = _step(model, seed=5)
    assert_grads_close(off, gpu)

    change = disable_gradient_checkpointing(model)
    assert change.previous_mode == "offload" and change.layers
    assert checkpointing_mode(model) is False
    runs = _count_attention_runs(model)
    _step(model)
    assert len(runs) == 3, "after disabling, no layer should be recomputed"


def test_peft_needs_no_input_require_grads():
    # Embeddings frozen and no input-grad hook: the first layer's LoRA weights still get gradients.
    model = _build("lora")
    assert not model.get_base_model().model.embed_tokens.weight.requires_grad
    _, ref = _step(model)
    enable_gradient_checkpointing(model, "offload")
    _, grads = _step(model)
    first = [n for n in grads if ".layers.0." in n and "lora_A" in n]
    assert first and all(grads[n].abs().sum() > 0 for n in first)
    assert_grads_close(grads, ref)


def test_offload_under_autocast_matches_standard():
    model = _build("lora")
    results = {}
    for mode in ("gpu", "offload"):
        enable_gradient_checkpointing(model, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[mode] = _step(model, seed=3)[1]
    # Both recompute under the same bf16 autocast; identical op order gives identical results.
    assert_grads_close(results["offload"], results["gpu"])


def test_offloaded_checkpoint_signature_and_no_grad():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    y = offloaded_checkpoint(lin, x, use_reentrant=False, preserve_rng_state=False)
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    lin2 = torch.nn.Linear(4, 4)
    lin2.load_state_dict(lin.state_dict())
    lin2(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(lin.weight.grad, lin2.weight.grad)
    with torch.no_grad():
        assert offloaded_checkpoint(lin, x).grad_fn is None
    with pytest.raises(ValueError, match="positional tensor"):
        offloaded_checkpoint(lambda: None)


def test_keyword_tensor_needing_grad_falls_back_to_standard_checkpointing():
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)
    y = offloaded_checkpoint(lambda h, scale: h * scale, x, scale=w)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.detach().sum(0))


def test_rejects_model_without_checkpointing_support():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "offload")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["gpu", "offload"])
def test_cuda_gradients_match(mode):
    model = _build("lora").cuda()
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 64), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return trainable_grads(model)

    ref = run()
    enable_gradient_checkpointing(model, mode)
    assert_grads_close(run(), ref, atol=1e-4, rtol=1e-4)  # TF32-free fp32 on GPU, but cuBLAS split order may differ


@pytest.mark.gpu
def test_cuda_offload_memory_does_not_grow_with_depth():
    def peak(layers, mode):
        model = tiny_model("llama", num_hidden_layers=layers, hidden_size=1024, intermediate_size=2048,
                           num_attention_heads=8, num_key_value_heads=8).cuda().train()
        # Frozen weights (as under LoRA) with a gradient flowing from the embeddings: weight gradients
        # would grow with depth whatever the checkpointing, and hide what this test measures.
        model.requires_grad_(False)
        model.enable_input_require_grads()
        enable_gradient_checkpointing(model, mode)
        ids = torch.randint(3, 500, (1, 4096), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    hidden_bytes = 4096 * 1024 * 4
    gpu_growth = peak(8, "gpu") - peak(2, "gpu")
    off_growth = peak(8, "offload") - peak(2, "offload")
    assert gpu_growth >= 5 * hidden_bytes  # six more layer inputs kept on the GPU
    assert off_growth < 2 * hidden_bytes


@pytest.mark.gpu
def test_cuda_copy_source_stays_counted_until_its_copy_is_done_and_round_trips():
    """The device tensor a host copy reads is held (and counted by the allocator) until that copy's event has
    completed, then released; the prefetch on the other direction's stream waits for the host copy."""
    from pronghorn.memory import offload

    offload._COPYING.release_finished()
    x = torch.randn(4096, 1024, device="cuda")
    want = x.clone()
    torch.cuda._sleep(50_000_000)  # the copy cannot finish before the checks below
    record = offload.OffloadedActivation(x, link=False)
    allocated = torch.cuda.memory_allocated()
    del x
    assert torch.cuda.memory_allocated() == allocated  # still held by the copy in flight
    assert len(offload._COPYING) == 1
    got = record.restore()  # prefetch on the to-device stream, ordered after the host copy
    torch.cuda.synchronize()
    offload._COPYING.release_finished()
    assert len(offload._COPYING) == 0
    assert torch.equal(got, want)


def test_host_budget_keeps_layers_on_device_once_host_memory_is_spoken_for(monkeypatch):
    """Pinned layer inputs stop at the host budget (read once), and released inputs return their share."""
    from pronghorn.memory import offload

    budget = offload.HostBudget()
    monkeypatch.setattr(offload, "available_host_bytes", lambda: offload.host_reserve_bytes() + 250)
    assert budget.take(100) and budget.take(100)
    assert not budget.take(100)  # 300 > 250: this layer's input would stay on the GPU
    budget.give(100)
    monkeypatch.setattr(offload, "available_host_bytes", lambda: 0)  # cached pinned blocks: not re-read
    assert budget.take(100)
    unknown = offload.HostBudget()
    monkeypatch.setattr(offload, "available_host_bytes", lambda: None)  # no /proc/meminfo: no limit
    assert unknown.take(10**15)


def test_spare_activations_leave_room_for_the_rest_of_a_forwards_layer_inputs(monkeypatch):
    """A parked gate (``spare``) never takes host memory that a later layer input of the forward will need: as
    many bytes as the largest forward so far has held in layer inputs."""
    from pronghorn.memory import offload

    budget = offload.HostBudget()
    monkeypatch.setattr(offload, "available_host_bytes", lambda: offload.host_reserve_bytes() + 1000)
    for _ in range(4):  # a first forward (no gates yet): 4 layer inputs of 100 bytes
        assert budget.take(100, layer_input=True)
    for _ in range(4):
        budget.give(100, layer_input=True)
    assert budget.inputs == 0 and budget.inputs_peak == 400
    assert budget.take(100, layer_input=True)
    assert budget.take(300, spare=True)  # 100 + 300 used, 300 more of inputs to come: 700 <= 1000
    assert not budget.take(400, spare=True)  # would leave the remaining inputs 200 of their 300
    assert budget.take(400)  # a layer input is not held back by the reserve
    assert not budget.take(1, spare=True)
    budget.give(300)
    assert budget.used == 500 and budget.inputs == 100


def test_host_chunks_cover_the_tensor_and_count_rounded_bytes():
    from pronghorn.memory import offload

    per = offload.HOST_CHUNK_BYTES // 2
    sizes = offload._chunk_sizes(2 * per + 3, 2)
    assert sizes == [per, per, 3] and sum(sizes) == 2 * per + 3
    assert offload._pinned_bytes(2 * per + 3, 2) == 2 * offload.HOST_CHUNK_BYTES + 8  # 6 bytes round up to 8
    assert offload._chunk_sizes(0, 2) == [0]  # an empty input still gets one (empty) buffer


@pytest.mark.parametrize("family,skips", [("llama", True), ("phi3", True), ("gemma2", False)])
def test_offload_recompute_skips_the_mlp_output_where_nothing_reads_it(family, skips, tmp_path, monkeypatch):
    """In the backward recompute the MLP output only feeds the residual add (no post-MLP norm), so its
    down GEMM is skipped there; gradients still equal those of an unpatched model without checkpointing."""
    from pronghorn import FastLanguageModel
    from pronghorn.kernels.lora import mlp as lora_mlp_module
    from tests.factories import save_tiny

    path = save_tiny(family, tmp_path / family, num_hidden_layers=2)

    def load(fast, gc):
        model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=64, fast_paths=fast)
        return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False, use_gradient_checkpointing=gc)

    seen = []
    apply = lora_mlp_module.LoraMLPFunction.apply
    monkeypatch.setattr(lora_mlp_module.LoraMLPFunction, "apply",
                        lambda *a: seen.append(a[3]) or apply(*a))
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for fast, gc in ((False, False), (True, "unsloth")):
        model = load(fast, gc)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), trainable_grads(model)))
    assert seen == [False, False] + [skips, skips], seen  # forward of 2 layers, then their recomputes
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    assert_grads_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_copies_in_flight_are_bounded():
    """A host far ahead of the GPU holds at most ``limit`` copy sources: past it, it waits for the oldest copy."""
    from pronghorn.memory import offload

    torch.cuda.synchronize()
    offload._COPYING.release_finished()
    torch.cuda._sleep(200_000_000)  # no copy can finish while the records below are made
    records = []
    for _ in range(5):
        records.append(offload.OffloadedActivation(torch.randn(1024, 1024, device="cuda"), link=False))
        assert len(offload._COPYING) <= offload._COPYING.limit
    torch.cuda.synchronize()
    offload._COPYING.release_finished()
    assert len(offload._COPYING) == 0
    del records


class _Copy:  # stands in for a copy's CUDA event
    def __init__(self):
        self.done = self.waited = False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = self.done = True


def test_copy_sources_wait_for_the_oldest_copy_past_their_limit():
    from pronghorn.memory import offload

    Copy = _Copy
    sources, copies = offload._CopySources(limit=2), [Copy() for _ in range(4)]
    for copy in copies[:2]:
        sources.hold(torch.zeros(1), copy)
    assert len(sources) == 2 and not any(c.waited for c in copies)
    copies[1].done = True  # finished on its own: released without waiting, but only in order
    sources.hold(torch.zeros(1), copies[2])
    assert copies[0].waited and not copies[1].waited and len(sources) == 2
    sources.hold(torch.zeros(1), copies[3])
    assert not copies[2].waited and len(sources) == 2  # copies[1] had finished: released, no wait


def test_stashed_copies_never_make_the_host_wait_and_stay_held_until_a_later_wait_covers_them():
    """Copies that do not pace the host (stashed activations) do not count toward the limit; a wait for a layer
    input's copy queued after them releases them too (one copy stream: they finished first)."""
    from pronghorn.memory import offload

    sources, copies = offload._CopySources(limit=2), [_Copy() for _ in range(6)]
    sources.hold(torch.zeros(1), copies[0])  # layer input
    for copy in copies[1:4]:
        sources.hold(torch.zeros(1), copy, paces_host=False)  # stashed gates
    assert len(sources) == 4 and not any(c.waited for c in copies)
    sources.hold(torch.zeros(1), copies[4])  # the second layer input: still within the limit
    assert len(sources) == 5 and not any(c.waited for c in copies)
    sources.hold(torch.zeros(1), copies[5])  # the third: waits for the first layer input only
    assert [c.waited for c in copies] == [True, False, False, False, False, False]
    assert len(sources) == 5  # the stashed gates queued after it are still held


def test_set_copy_lead_sets_the_bound_and_rejects_less_than_one_layer():
    from pronghorn.memory import offload

    default = offload._COPYING.limit
    try:
        offload.set_copy_lead(5)
        assert offload._COPYING.limit == 5
        with pytest.raises(ValueError, match="at least 1 layer, got 0"):
            offload.set_copy_lead(0)
        assert offload._COPYING.limit == 5
    finally:
        offload.set_copy_lead(default)
    assert offload._COPYING.limit == 2
