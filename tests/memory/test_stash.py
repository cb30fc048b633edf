"""Stashed MLP gate outputs (pronghorn.memory.stash): the recompute takes them instead of re-running the gate
GEMM, and the gradients stay those of an unpatched model without checkpointing."""
import pytest
import torch

from pronghorn.kernels.lora import projection
from pronghorn.memory import stash as stash_module
from tests.memory._util import assert_grads_close, trainable_grads


@pytest.fixture
def stashed_layers():
    def set_layers(n, **kwargs):
        stash_module.set_stashed_layers(n, **kwargs)

    yield set_layers
    stash_module.set_stashed_layers(0)


def _load(path, fast, gc):
    from pronghorn import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=64, fast_paths=fast)
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False, use_gradient_checkpointing=gc)


@pytest.mark.parametrize("family,layers,tiles", [("llama", 3, 1), ("llama", 1, 1), ("phi3", 3, 1), ("gemma2", 2, 1),
                                                 ("llama", 2, 5)])
def test_recompute_takes_the_stash_and_gradients_are_unchanged(family, layers, tiles, stashed_layers, tmp_path,
                                                               monkeypatch):
    from tests.factories import save_tiny

    path = save_tiny(family, tmp_path / family, num_hidden_layers=3)
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    reference = _load(path, False, False)
    reference.train()
    reference(input_ids=ids, labels=ids).loss.backward()

    stashed_layers(layers)
    model = _load(path, True, "unsloth")
    if tiles > 1:  # the tiled MLP puts and takes once per tile: 2 x 10 tokens in tiles of 4
        from pronghorn.memory.tiled_mlp import enable_tiled_mlp

        enable_tiled_mlp(model, tile_tokens=4)
    model.train()
    computed = []  # how many gate/up projections each MLP call computes: all of them, or all but the stashed one
    project = projection.project
    monkeypatch.setattr("pronghorn.kernels.lora.mlp.project",
                        lambda x2, parts, xas, dtype, into=None: computed.append(len(parts))
                        or project(x2, parts, xas, dtype, into))
    all_of_them = 1 if family == "phi3" else 2  # Phi-3's fused gate_up is one projection, parked whole
    for _ in range(2):  # the second step checks that layer counting restarts with every forward
        computed.clear()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        assert computed.count(all_of_them - 1) == layers * tiles, computed  # each stashed recompute took one
    assert_grads_close(trainable_grads(model), trainable_grads(reference), atol=1e-5, rtol=1e-4)


def test_a_full_host_budget_drops_the_stash_and_the_recompute_computes(stashed_layers, monkeypatch):
    from pronghorn.memory.offload import OffloadedActivation

    stash = stash_module.LayerStash()
    t = torch.randn(4, 8)
    monkeypatch.setattr(OffloadedActivation, "__init__", _unparked_init)
    stash.put("mlp", [t, t])
    assert stash.take("mlp") is None


def _unparked_init(self, tensor, link=True, keep_on_device=True, paces_host=True):
    self.parked, self._host, self._source, self._restored, self._host_bytes = False, None, None, None, 0


def test_takes_follow_puts_in_order():
    stash = stash_module.LayerStash()
    a, b = torch.ones(2), torch.zeros(2)
    stash.put("mlp", [a])
    stash.put("mlp", [b])  # the tiled MLP puts once per tile
    assert torch.equal(stash.take("mlp")[0], a) and torch.equal(stash.take("mlp")[0], b)
    assert stash.take("mlp") is None


def test_only_the_first_output_is_parked_and_the_rest_come_back_as_none():
    stash = stash_module.LayerStash()
    gate, up = torch.ones(3), torch.zeros(3)
    stash.put("mlp", [gate, up])
    got = stash.take("mlp")
    assert torch.equal(got[0], gate) and got[1] is None


def test_a_layer_parks_nothing_while_earlier_copies_are_still_on_their_way(monkeypatch):
    from pronghorn.memory import offload

    stash = stash_module.LayerStash()
    gate = torch.ones(8)  # 32 bytes
    monkeypatch.setattr(offload, "copies_in_flight_bytes", lambda: stash_module.IN_FLIGHT * 32 + 1)
    stash.put("mlp", [gate, gate])
    assert stash.take("mlp") is None  # the recompute computes the gate itself
    monkeypatch.setattr(offload, "copies_in_flight_bytes", lambda: stash_module.IN_FLIGHT * 32)
    stash.put("mlp", [gate, gate])
    assert stash.take("mlp") is not None


def test_parked_and_skipped_layers_are_counted_per_name(monkeypatch):
    from pronghorn.memory import offload

    monkeypatch.setattr(stash_module, "STATS", stash_module.defaultdict(lambda: {"parked": 0, "skipped": 0}))
    stash = stash_module.LayerStash()
    stash.put("mlp", [torch.ones(4), torch.ones(4)])
    stash.put("residual", [torch.ones(4)])
    monkeypatch.setattr(offload, "copies_in_flight_bytes", lambda: 10**9)
    stash.put("mlp", [torch.ones(4), torch.ones(4)])
    assert stash_module.STATS == {"mlp": {"parked": 1, "skipped": 1}, "residual": {"parked": 1, "skipped": 0}}


def test_has_tells_whether_the_next_take_returns_a_tensor(monkeypatch):
    from pronghorn.memory import offload

    stash = stash_module.LayerStash()
    assert not stash.has("residual")
    stash.put("residual", [torch.ones(4)])
    monkeypatch.setattr(offload, "copies_in_flight_bytes", lambda: 10**9)
    stash.put("residual", [torch.ones(4)])  # copies behind: parks nothing
    assert stash.has("residual") and stash.take("residual") is not None
    assert not stash.has("residual") and stash.take("residual") is None


def test_layer_count_and_first_layer_must_not_be_negative():
    with pytest.raises(ValueError, match="n='-1': expected a number of layers"):
        stash_module.set_stashed_layers(-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        stash_module.set_stashed_layers(2, first=-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        stash_module.set_stashed_layers(2, late_layers=-1)


def test_by_default_every_layer_the_caller_allows_stashes_and_fetches_late(stashed_layers):
    stashed_layers(stash_module.AUTO)
    stash_module.begin_forward()
    got = [stash_module.next_layer_stash(auto=allowed) for allowed in (True, False, True)]
    assert got[1] is None and all(s.mlp and s.late for s in (got[0], got[2]))


@pytest.mark.parametrize("value,want", [("auto", "auto"), (" Auto", "auto"), ("", 0), ("0", 0), ("12", 12)])
def test_layer_settings_read_as_auto_or_a_count(value, want):
    assert stash_module._layers(value, "X") == want


def test_a_bad_layer_setting_names_its_source():
    with pytest.raises(ValueError, match="PRONGHORN_STASH_MLP_LAYERS='all'.*'auto'"):
        stash_module._layers("all", stash_module.ENV_LAYERS)


def test_a_range_of_layers_stashes(stashed_layers):
    stashed_layers(2, first=1)
    stash_module.begin_forward()
    got = [stash_module.next_layer_stash() for _ in range(5)]
    assert [s is not None and s.mlp for s in got] == [False, True, True, False, False]
    stashed_layers(3, late_layers=2)
    stash_module.begin_forward()
    assert [stash_module.next_layer_stash().late for _ in range(3)] == [True, True, False]


def test_a_late_fetch_waits_for_the_next_layers_mlp_backward(stashed_layers, tmp_path, monkeypatch):
    """With ``late_layers`` a layer's stash comes back from the hook on the next layer's MLP input gradient (its
    MLP backward is done), and gradients are those of the usual fetch."""
    import inspect

    from tests.factories import save_tiny

    path = save_tiny("llama", tmp_path / "llama", num_hidden_layers=3)
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    fetched_from = []
    prefetch = stash_module.LayerStash.prefetch
    monkeypatch.setattr(stash_module.LayerStash, "prefetch",
                        lambda self: fetched_from.append(inspect.stack()[2].function) or prefetch(self))
    for late in (0, 3):
        stashed_layers(2, late_layers=late)
        model = _load(path, True, "unsloth")
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(trainable_grads(model))
    # layer 2's backward fetches layer 1's stash, layer 1's fetches layer 0's
    assert fetched_from == ["backward"] * 2 + ["_fetch_hook"] * 2  # offload backward, or the hook
    assert_grads_close(grads[1], grads[0], atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_stash_gives_the_gradients_of_the_plain_recompute(stashed_layers, residual_stash, eager_layers,
                                                                tmp_path):
    """On CUDA the stash goes through pinned host memory on the side stream and back: MLP gates and residuals
    parked, or neither, give the same gradients."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.factories import save_tiny

    path = save_tiny("llama", tmp_path / "llama", num_hidden_layers=3)
    ids = torch.randint(5, 500, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    grads, parked = [], []
    for layers, residual in ((0, False), (2, True), (stash_module.AUTO, False)):
        stashed_layers(layers)
        residual_stash(residual)
        stash_module.STATS.clear()
        model = _load(path, True, "unsloth").cuda()
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(trainable_grads(model))
        parked.append(stash_module.STATS["mlp"]["parked"])
    assert parked == [0, 2, 3]  # the default parks every (ungraphed) layer's gate
    for got in grads[1:]:
        assert_grads_close(got, grads[0], atol=0, rtol=0)  # the same values, fetched instead of recomputed


@pytest.fixture
def eager_layers():
    """No layer graphed: "auto" stashes only layers the graph mode leaves eager, and by default it graphs all."""
    from pronghorn.memory import layer_graphs

    mode = layer_graphs._config["mode"]
    layer_graphs.set_layer_graphs("off")
    yield
    layer_graphs.set_layer_graphs(mode)


@pytest.fixture
def residual_stash():
    yield stash_module.set_residual_stash
    stash_module.set_residual_stash(False)


@pytest.mark.parametrize("family,skips", [("llama", True), ("qwen3", True), ("phi3", True), ("gemma", True),
                                          ("gemma2", False)])
def test_recompute_skips_o_proj_and_reads_the_parked_residual(family, skips, residual_stash, tmp_path, monkeypatch):
    """With the residual stash on, each offloaded-checkpointed layer parks its post-attention residual; the recompute
    then runs no o_proj
    GEMM (except Gemma 2, whose attention output passes a norm before the add) and the gradients are those of the
    unpatched model, and bit for bit those of the recompute that computes o_proj."""
    from pronghorn.kernels.lora import function
    from tests.factories import save_tiny

    layers = 3
    path = save_tiny(family, tmp_path / family, num_hidden_layers=layers)
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    reference = _load(path, False, False)
    reference.train()
    reference(input_ids=ids, labels=ids).loss.backward()

    o_outputs = []  # o_proj outputs computed (forward_shared also serves q/k/v and the MLP's down)
    forward_shared = function.forward_shared

    def counting(x2, parts, dtype):
        if len(parts) == 1 and parts[0].weight.shape[0] == parts[0].weight.shape[1] == x2.shape[1]:
            o_outputs.append(1)
        return forward_shared(x2, parts, dtype)

    monkeypatch.setattr(function, "forward_shared", counting)
    grads = {}
    for on in (True, False):
        residual_stash(on)
        model = _load(path, True, "unsloth")
        model.train()
        stash_module.STATS.clear()
        o_outputs.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[on] = trainable_grads(model)
        expected = layers if on and skips else 2 * layers  # forward, plus the recompute unless it skipped
        assert len(o_outputs) == expected, (on, o_outputs)
        assert stash_module.STATS["residual"]["parked"] == (layers if on and skips else 0)
    assert_grads_close(grads[True], trainable_grads(reference), atol=1e-5, rtol=1e-4)
    assert_grads_close(grads[True], grads[False], atol=0, rtol=0)


def test_with_value_forwards_the_value_and_backpropagates_into_the_graph():
    from pronghorn.memory.recompute import with_value

    a = torch.randn(3, 4, requires_grad=True)
    graph = a * 0  # a placeholder built from a
    value = torch.randn(3, 4)
    out = with_value(graph, value)
    assert torch.equal(out, value)
    (out * 2).sum().backward()
    assert torch.equal(a.grad, torch.zeros(3, 4))  # d(a*0)/da = 0: the gradient went through graph, not value
    b = torch.randn(3, 4, requires_grad=True)
    with_value(b + 0, value).sum().backward()
    assert torch.equal(b.grad, torch.ones(3, 4))
    with pytest.raises(ValueError, match="shape"):
        with_value(graph, torch.randn(4, 3))
