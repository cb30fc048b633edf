"""CUDA graphs of checkpointed layers (pronghorn.memory.layer_graphs): which calls may be graphed, how gradients
reach ``.grad``, and (on the GPU) that graphed training gives the losses and gradients of eager training."""
import functools

import pytest
import torch
from torch import nn

from pronghorn.kernels.lora import mlp_chunked
from pronghorn.memory import graph_stash, layer_graphs
from pronghorn.memory.layer_graphs import _Ineligible
from tests.memory._util import (
    assert_grads_close,
    cuda_ids,
    offloaded_lora_model,
    trainable_grads,
)


@pytest.fixture(autouse=True)
def _same_mlp_backward_eagerly():
    """Captured recomputes use the chunked MLP backward; eager ones here do too, so graphed and eager gradients
    come from the same arithmetic (the chunked backward is checked against the full-width one in
    tests/kernels/test_lora_mlp_chunked.py). A recompute that reads its parked gate takes the full-width backward,
    so graphs park no gates here unless a test says so (:func:`parked_gates`)."""
    parks = graph_stash.enabled(), graph_stash.parks_quantized()
    mlp_chunked.set_chunked_mlp("always")
    graph_stash.set_graph_gate_stash(False)
    yield
    mlp_chunked.set_chunked_mlp("capture")
    graph_stash.set_graph_gate_stash(*parks)


def _park_gates(on: bool) -> None:
    """Graphs park their MLP gates (pronghorn.memory.graph_stash) and every MLP backward, graphed or eager, is
    full-width: bf16 layers take it outside captures and (then) inside them too."""
    graph_stash.set_graph_gate_stash(on)
    mlp_chunked.set_chunked_mlp("capture" if on else "always")


pytestmark = pytest.mark.usefixtures("cudnn_attention_at_once")


@pytest.fixture(autouse=True)
def _mode_restored():
    mode = layer_graphs._config["mode"]
    yield
    layer_graphs.set_layer_graphs(mode)


@pytest.fixture
def graphs_on():
    layer_graphs.set_layer_graphs(True)


def test_modes_and_their_spellings(monkeypatch):
    assert layer_graphs._mode("quantized", "x") == "quantized" and layer_graphs._mode("Auto", "x") == "auto"
    for value, mode in ((True, "on"), (False, "off"), ("1", "on"), (" Off ", "off"), ("no", "off"), ("ON", "on")):
        assert layer_graphs._mode(value, "x") == mode
    with pytest.raises(ValueError, match="PRONGHORN_CUDA_GRAPHS='sometimes': .* one of"):
        layer_graphs._mode("sometimes", layer_graphs.ENV)
    layer_graphs.set_layer_graphs("off")
    assert not layer_graphs.layer_graphs_enabled()
    layer_graphs.set_layer_graphs("quantized")
    assert layer_graphs.layer_graphs_enabled()


@pytest.mark.parametrize("attention,graphed", [("sdpa", True), ("flash_attention_2", True), ("eager", False)])
def test_auto_graphs_layers_without_eager_attention_and_quantized_only_4bit_ones(attention, graphed):
    """Eager attention keeps its score matrix in the graphs' pool, so such layers stay eager in both modes."""
    bnb = pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    def layer(*modules):
        out = nn.Sequential(*modules)
        out.self_attn = nn.Module()
        out.self_attn.config = SimpleNamespace(_attn_implementation=attention)
        return out

    plain = layer(nn.Linear(64, 64))
    mixed = layer(nn.Linear(64, 64), bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu"))
    assert layer_graphs._graphed_by_mode(plain, "auto") is graphed
    assert layer_graphs._graphed_by_mode(mixed, "auto") is graphed
    assert not layer_graphs._graphed_by_mode(plain, "quantized")
    assert layer_graphs._graphed_by_mode(mixed, "quantized") is graphed
    assert not layer_graphs._graphed_by_mode(None, "auto")


def test_the_mode_is_asked_before_anything_else():
    """Off, a CPU input, or (quantized) a layer without 4-bit weights: no graph; "on", and "auto" for a layer
    without eager attention: any CUDA call may be."""
    from types import SimpleNamespace

    call, on_gpu = functools.partial(nn.Linear(4, 4).__call__), SimpleNamespace(is_cuda=True)
    for mode, hidden, allowed in (("off", on_gpu, False), ("on", torch.zeros(1), False), ("on", on_gpu, True),
                                  ("quantized", on_gpu, False), ("auto", on_gpu, True)):
        layer_graphs.set_layer_graphs(mode)
        assert layer_graphs.mode_allows(call, hidden) is allowed


def test_cpu_calls_run_eagerly(graphs_on):
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for _ in range(3):
        assert layer_graphs.run_forward(functools.partial(layer.__call__), (x,), 0) == (None, None)
    assert not layer_graphs._state.graphs


def test_a_call_is_described_by_shapes_and_plain_values_and_rebuilt_in_order():
    a, b = torch.randn(2, 3), torch.randn(5)
    value = ([a], (), {"pos": (b, None), "flag": True, "n": 3})
    tensors = []
    spec = layer_graphs._describe(value, tensors)
    assert tensors == [a, b]
    other = []
    assert layer_graphs._describe(([a + 1], (), {"pos": (b * 2, None), "flag": True, "n": 3}), other) == spec
    assert layer_graphs._describe(([a], (), {"pos": (b, None), "flag": False, "n": 3}), []) != spec
    c, d = torch.zeros(2, 3), torch.zeros(5)
    rebuilt = layer_graphs._rebuild(value, iter([c, d]))
    assert rebuilt[0][0] is c and rebuilt[2]["pos"][0] is d and rebuilt[2]["flag"] is True


def test_arguments_a_graph_cannot_replay_are_refused():
    with pytest.raises(_Ineligible, match="of type object"):
        layer_graphs._describe({"cache": object()}, [])


def test_the_checkpointed_function_must_be_a_module_call():
    assert layer_graphs._layer_of(functools.partial(nn.Linear(2, 2).__call__)) is not None
    assert layer_graphs._layer_of(lambda x: x) is None
    assert layer_graphs._layer_of(functools.partial(torch.relu)) is None


def test_dropout_and_gradient_hooks_keep_a_layer_eager():
    layer = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)).train()
    with pytest.raises(_Ineligible, match="dropout"):
        layer_graphs._check_layer(layer)
    layer.eval()
    assert len(layer_graphs._check_layer(layer)) == 2
    layer[0].weight.register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(_Ineligible, match="hook"):
        layer_graphs._check_layer(layer)


def test_a_layer_whose_mlp_runs_in_tiles_stays_eager(tmp_path):
    """The tiled MLP's backward adds its parameters' gradients to ``.grad`` itself, which a graphed backward (it
    hands gradients over after the replay) would lose."""
    from pronghorn.memory.tiled_mlp import enable_tiled_mlp
    from tests.factories import tiny_model

    model = tiny_model("llama")
    layer = model.model.layers[0]
    layer_graphs._check_layer(layer)
    patch = enable_tiled_mlp(model, tile_tokens=4)
    with pytest.raises(_Ineligible, match="tiled MLP"):
        layer_graphs._check_layer(layer)
    patch.revert()
    layer_graphs._check_layer(layer)


def test_a_layer_with_dropout_is_never_captured_and_runs_eagerly():
    layer = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    layer_graphs.reset()
    key = ("forward", id(layer))
    assert layer_graphs._capture_forward(key, functools.partial(layer.__call__), None, [], None, None, False) is None
    assert "dropout" in layer_graphs._state.failed[key] and not layer_graphs._state.graphs


def test_the_layer_state_follows_training_mode_and_trainable_parameters():
    layer = nn.Sequential(nn.Linear(4, 4))
    first = layer_graphs._layer_state(layer)
    layer[0].bias.requires_grad_(False)
    second = layer_graphs._layer_state(layer)
    layer.eval()
    assert len({first, second, layer_graphs._layer_state(layer)}) == 3


def test_parameter_gradients_are_handed_over_like_autograd_would():
    """New tensors where ``.grad`` is None (freed again by zero_grad), added where it holds a gradient, nothing for
    a parameter without one; the scratch the graph writes is reused."""
    layer_graphs.reset()
    a, b, c = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(1))
    grads = layer_graphs._ParamGrads([a, b, c])
    grads.write([torch.full((2, 3), 2.0), torch.full((4,), 3.0), None])
    grads.hand_off()
    assert torch.equal(a.grad, torch.full((2, 3), 2.0)) and torch.equal(b.grad, torch.full((4,), 3.0))
    assert c.grad is None
    scratch = grads.groups[0][1]
    assert a.grad.data_ptr() != scratch.data_ptr()  # the .grad tensors are not the scratch
    grads.hand_off()  # a second micro-batch: accumulated
    assert torch.equal(a.grad, torch.full((2, 3), 4.0)) and torch.equal(b.grad, torch.full((4,), 6.0))
    a.grad = None  # one parameter zeroed by set_to_none, the other still holding its gradient
    grads.hand_off()
    assert torch.equal(a.grad, torch.full((2, 3), 2.0)) and torch.equal(b.grad, torch.full((4,), 9.0))


def test_marked_positions_get_a_marked_static_buffer_that_is_never_copied():
    from pronghorn.nn.positions import (
        holds_one_sequence_per_row,
        one_sequence_positions,
    )

    layer_graphs.reset()
    pos = one_sequence_positions(6, "cpu")
    buf = layer_graphs._buffer(("arg", 0), pos, marked=True)
    assert holds_one_sequence_per_row(buf) and torch.equal(buf, pos)
    layer_graphs._fill(buf, torch.zeros_like(pos), always=True)
    assert torch.equal(buf, pos)


def test_static_buffers_copy_a_tensor_again_only_when_it_changed():
    layer_graphs.reset()
    src = torch.ones(4)
    buf = layer_graphs._buffer(("arg", 1), src)
    layer_graphs._fill(buf, src, always=False)
    buf.zero_()
    layer_graphs._fill(buf, src, always=False)  # same tensor, same version: not copied
    assert torch.equal(buf, torch.zeros(4))
    src.add_(1)
    layer_graphs._fill(buf, src, always=False)
    assert torch.equal(buf, torch.full((4,), 2.0))


# ------------------------------------------------------------------------------------------------- GPU


def _loss_and_grads(model, ids, micro_batches=2):
    """Loss and trainable gradients of ``micro_batches`` accumulated backward passes over ``ids``."""
    for _ in range(micro_batches):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _graphed_then_eager(model, batches, check):
    """Train on ``batches`` (AdamW, two micro-batches per step) with graphs on, then take the gradients of the
    ``check`` batch twice at the same weights: replayed from the graphs, and eagerly. Returns both and the
    number of graphs."""
    layer_graphs.set_layer_graphs(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for ids in batches:
        _loss_and_grads(model, ids)  # leaves the gradients in .grad for the optimizer
        opt.step()
        opt.zero_grad(set_to_none=True)
    replays = layer_graphs._state.replays
    graphed = _loss_and_grads(model, check)
    assert layer_graphs._state.replays > replays, "the checked step was not replayed"
    captured = len(layer_graphs._state.graphs)
    layer_graphs.set_layer_graphs(False)
    return graphed, _loss_and_grads(model, check), captured


def _assert_same(graphed, eager):
    assert graphed[0] == pytest.approx(eager[0], rel=1e-3)
    assert_grads_close(graphed[1], eager[1], atol=2e-4, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("parks", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_graphed_layers_give_the_gradients_of_eager_layers_after_weight_updates(family, parks, tmp_path):
    """Replays read the weights the optimizer updated (LoRA factors are cast inside the graph) and accumulate
    micro-batch gradients into ``.grad`` like autograd, with the MLP gates parked or recomputed."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    _park_gates(parks)
    model = offloaded_lora_model(tmp_path, family, 3)
    graphed, eager, captured = _graphed_then_eager(model, [cuda_ids(64, s) for s in range(3)], cuda_ids(64, 9))
    assert captured == 6  # forward and backward of each of the 3 layers
    _assert_same(graphed, eager)


@pytest.mark.gpu
def test_graphs_follow_sequence_length_and_adapter_state(tmp_path):
    """A new length runs eagerly and then gets graphs of its own (and gate slots of its own); a step with the
    adapter disabled runs the layers in that state, not the graphs captured with the adapter on."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    _park_gates(True)

    model = offloaded_lora_model(tmp_path, "llama", 2)
    batches = [cuda_ids(64, 0), cuda_ids(96, 1), cuda_ids(64, 2), cuda_ids(96, 3), cuda_ids(96, 4)]
    layer_graphs.set_layer_graphs(True)
    on = _loss_and_grads(model, cuda_ids(96, 5))[0]
    with model.disable_adapter():  # eager, captured, replayed: the base model's loss each time
        off = [_loss_and_grads(model, cuda_ids(96, 5))[0] for _ in range(3)]
    assert layer_graphs._state.replays > 0
    assert off[2] == pytest.approx(off[0], rel=1e-3) and off[0] != pytest.approx(on, rel=1e-3)
    layer_graphs.set_layer_graphs(False)
    graphed, eager, captured = _graphed_then_eager(model, batches, cuda_ids(96, 9))
    assert captured == 8  # 2 lengths x forward/backward x 2 layers
    _assert_same(graphed, eager)


@pytest.mark.gpu
def test_graphed_qlora_layers_give_the_gradients_of_eager_layers(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")

    model = offloaded_lora_model(tmp_path, "llama", 2, quantized=True)
    graphed, eager, captured = _graphed_then_eager(model, [cuda_ids(64, s) for s in range(3)], cuda_ids(64, 9))
    assert captured == 4
    _assert_same(graphed, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,family,quantized,graphs", [
    ("quantized", "llama", False, 0), ("quantized", "llama", True, 4), ("quantized", "gemma2", True, 0),
    ("auto", "llama", False, 4), ("auto", "gemma2", False, 0),
])
def test_the_modes_graph_the_layers_they_name(mode, family, quantized, graphs, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if quantized:
        pytest.importorskip("bitsandbytes")

    layer_graphs.set_layer_graphs(mode)
    layer_graphs.reset()
    model = offloaded_lora_model(tmp_path, family, 2, quantized=quantized)
    if family == "gemma2" and model.config._attn_implementation != "eager":
        pytest.skip("flash-attn is installed: Gemma 2's softcapping does not need eager attention here")
    for seed in range(3):
        _loss_and_grads(model, cuda_ids(64, seed), micro_batches=1)
    assert len(layer_graphs._state.graphs) == graphs
