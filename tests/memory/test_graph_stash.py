"""MLP gates of graphed layers parked in host memory (pronghorn.memory.graph_stash): slots alternate between
neighbouring layers, the recompute graphs read the gate instead of computing it, and gradients do not change."""
import pytest
import torch

from pronghorn.kernels.lora import mlp_chunked, projection
from pronghorn.memory import graph_stash, layer_graphs
from pronghorn.memory.recompute import in_backward_recompute
from pronghorn.memory.stash import STATS
from tests.memory._util import (
    assert_grads_close,
    cuda_ids,
    offloaded_lora_model,
    trainable_grads,
)

pytestmark = pytest.mark.usefixtures("cudnn_attention_at_once")


@pytest.fixture(autouse=True)
def _fresh_state():
    mode, on, quantized = layer_graphs._config["mode"], graph_stash.enabled(), graph_stash.parks_quantized()
    layer_graphs.reset()
    yield
    graph_stash.set_graph_gate_stash(on, quantized)
    layer_graphs.set_layer_graphs(mode)
    layer_graphs.reset()


def _call(stash, gates, extra=(None,)):
    """One run of a layer's MLP (or of several, tiled): each gate GEMM writes where the stash says."""
    for gate in gates:
        buffer = stash.gate_buffer(tuple(gate.shape), gate.dtype, gate.device)
        if buffer is not None:
            buffer.copy_(gate)
        stash.put("mlp", [gate if buffer is None else buffer, *extra])
    stash.end_call()


def test_neighbouring_layers_take_different_slots_and_keep_them():
    gate = torch.randn(6, 10)
    stashes = [graph_stash.slot_stash(layer) for layer in (101, 102, 103)]
    for stash in stashes:
        _call(stash, [gate])
    first, second, third = (s.slot for s in stashes)
    assert first is not second and first is third
    assert graph_stash.slot_stash(102).slot is None  # a new stand-in learns its slot from its first gate
    again = graph_stash.slot_stash(102)
    _call(again, [gate * 2])
    assert again.slot is second and torch.equal(second.buffer, gate * 2)
    other_shape = graph_stash.slot_stash(101)
    _call(other_shape, [torch.ones(3, 10)])
    assert other_shape.slot is not first  # one buffer per slot and gate shape


def test_the_recompute_takes_the_slot_buffer_for_the_gate_and_computes_the_rest():
    stash = graph_stash.slot_stash(7)
    assert not stash.has("mlp") and stash.take("mlp") is None
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    for _ in range(2):  # the capture's warm-up, then the capture
        _call(stash, [gate], extra=(up,))
    taken = stash.take("mlp")
    assert taken[0] is stash.slot.buffer and taken[1] is None and torch.equal(taken[0], gate)
    assert not stash.has("residual")
    fused = graph_stash.slot_stash(8)  # Phi-3's fused gate_up is one output, parked whole
    _call(fused, [torch.randn(4, 12)], extra=())
    assert len(fused.take("mlp")) == 1


def test_a_tiled_mlp_parks_nothing():
    """The tiled MLP runs once per token tile; one slot cannot hold every tile's gate, so the later tiles compute
    into their own tensors and the layer parks nothing (its recompute computes the gate)."""
    stash = graph_stash.slot_stash(9)
    tiles = [torch.randn(4, 6), torch.randn(4, 6), torch.randn(2, 6)]
    buffers = []
    for tile in tiles:
        buffers.append(stash.gate_buffer(tuple(tile.shape), tile.dtype, tile.device))
        stash.put("mlp", [tile if buffers[-1] is None else buffers[-1], None])
    assert buffers[0] is stash.slot.buffer and buffers[1:] == [None, None]
    assert not stash.has("mlp") and stash.take("mlp") is None
    stash.end_call()
    assert stash.gate_buffer((4, 6), torch.float32, torch.device("cpu")) is None  # nor in the capture after it


def test_the_switch_and_its_environment_variable():
    import subprocess
    import sys

    graph_stash.set_graph_gate_stash(False)
    assert not graph_stash.enabled()
    graph_stash.set_graph_gate_stash(True)
    assert graph_stash.enabled() and graph_stash.parks_quantized()
    graph_stash.set_graph_gate_stash(False)
    assert not graph_stash.parks_quantized()
    code = "from pronghorn.memory import graph_stash as g; print(g.enabled(), g.parks_quantized())"
    for word, expected in [("0", "False False"), ("float", "True False"), ("1", "True True")]:
        env = {**__import__("os").environ, graph_stash.ENV: word}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, word


# ------------------------------------------------------------------------------------------------- GPU


def _step(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _replayed(model, parks: bool, steps: int = 4, quantized: bool = True):
    """Loss and gradients of the last of ``steps`` steps on one batch (captured at the second and third, replayed
    at the fourth), with graphed layers parking their gates or not (``quantized``: 4-bit layers too)."""
    graph_stash.set_graph_gate_stash(parks, quantized)
    layer_graphs.set_layer_graphs("auto")
    layer_graphs.reset()
    for _ in range(steps - 1):
        _step(model, cuda_ids(64, 0))
    replays = layer_graphs._state.replays
    result = _step(model, cuda_ids(64, 0))
    assert layer_graphs._state.replays > replays
    return result


@pytest.mark.gpu
@pytest.mark.parametrize("family,computed", [("llama", 1), ("phi3", 0)])
def test_recompute_graphs_read_the_parked_gate_and_give_bit_identical_gradients(family, computed, tmp_path,
                                                                                 monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    mlp_chunked.set_chunked_mlp("capture")
    model = offloaded_lora_model(tmp_path, family, 3)
    counts = []  # projections each captured recompute computes: up alone (Phi-3's fused gate_up: none)
    project = projection.project

    def counting(x2, parts, xas, dtype, into=None):
        if torch.cuda.is_current_stream_capturing() and in_backward_recompute():
            counts.append(len(parts))
        return project(x2, parts, xas, dtype, into)

    monkeypatch.setattr("pronghorn.kernels.lora.mlp.project", counting)
    STATS.clear()
    parked = _replayed(model, parks=True)
    assert counts == [computed] * 3, counts
    assert STATS["graphed gate"]["parked"] >= 3 * 3 and STATS["graphed gate"]["skipped"] == 0
    counts.clear()
    computed_again = _replayed(model, parks=False)
    assert counts == [computed + 1] * 3, counts
    assert parked[0] == computed_again[0]
    assert_grads_close(parked[1], computed_again[1], atol=0, rtol=0)
    layer_graphs.set_layer_graphs("off")
    eager = _step(model, cuda_ids(64, 0))
    assert parked[0] == pytest.approx(eager[0], rel=1e-3)
    assert_grads_close(parked[1], eager[1], atol=2e-4, rtol=2e-2)


@pytest.mark.gpu
def test_a_parked_gate_whose_backward_runs_eagerly_is_dropped_and_the_gradients_stay_right(tmp_path, monkeypatch):
    """Graphs turned off between forward and backward: the recompute runs eagerly and computes its gate."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pronghorn.memory import offload

    model = offloaded_lora_model(tmp_path, "llama", 2)
    reference = _replayed(model, parks=True)
    STATS.clear()
    used = offload.HOST_BUDGET.used
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=cuda_ids(64, 0), labels=cuda_ids(64, 0)).loss  # replayed forwards park their gates
    assert offload.HOST_BUDGET.used > used and STATS["graphed gate"]["parked"] == 2
    monkeypatch.setattr(layer_graphs, "mode_allows", lambda function, hidden: False)
    loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    assert offload.HOST_BUDGET.used == used  # every parked gate gave its host memory back
    assert loss.item() == pytest.approx(reference[0], rel=1e-3)
    assert_grads_close(grads, reference[1], atol=2e-4, rtol=2e-2)


@pytest.mark.gpu
def test_two_forwards_before_one_backward_each_get_their_own_gates_back(tmp_path):
    """Preference and RL losses run the model twice before backward: the second forward's replays reuse the
    slots, so each recompute must read the gate its own forward parked (from host memory)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    model = offloaded_lora_model(tmp_path, "llama", 3)
    _replayed(model, parks=True)  # captures every forward and backward graph

    def two_forwards():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            first, second = cuda_ids(64, 1), cuda_ids(64, 2)
            loss = model(input_ids=first, labels=first).loss + 0.5 * model(input_ids=second, labels=second).loss
        loss.backward()
        grads = trainable_grads(model)
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    STATS.clear()
    replays = layer_graphs._state.replays
    parked = two_forwards()
    assert layer_graphs._state.replays - replays == 12 and STATS["graphed gate"]["parked"] == 6
    layer_graphs.set_layer_graphs("off")
    eager = two_forwards()
    assert parked[0] == pytest.approx(eager[0], rel=1e-3)
    assert_grads_close(parked[1], eager[1], atol=2e-4, rtol=2e-2)


@pytest.mark.gpu
def test_4bit_layers_park_their_gates_unless_told_not_to_and_give_eager_gradients(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")

    model = offloaded_lora_model(tmp_path, "llama", 2, quantized=True)
    STATS.clear()
    _replayed(model, parks=True, quantized=False)
    assert STATS["graphed gate"]["parked"] == 0  # 4-bit layers then keep their chunked MLP backward
    parked = _replayed(model, parks=True)
    assert STATS["graphed gate"]["parked"] >= 2 * 2
    layer_graphs.set_layer_graphs("off")  # eager layers outside captures take the full-width backward too
    eager = _step(model, cuda_ids(64, 0))
    assert parked[0] == pytest.approx(eager[0], rel=1e-3)
    assert_grads_close(parked[1], eager[1], atol=2e-4, rtol=2e-2)


@pytest.mark.gpu
def test_layers_with_a_tiled_mlp_stay_eager_and_give_eager_gradients(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from pronghorn.memory.tiled_mlp import enable_tiled_mlp

    model = offloaded_lora_model(tmp_path, "llama", 2)
    enable_tiled_mlp(model, tile_tokens=48)  # 2 x 64 tokens: three tiles per MLP call
    STATS.clear()
    graph_stash.set_graph_gate_stash(True)
    layer_graphs.set_layer_graphs("auto")
    layer_graphs.reset()
    for _ in range(3):
        tiled = _step(model, cuda_ids(64, 0))
    assert layer_graphs._state.replays == 0 and STATS["graphed gate"]["parked"] == 0
    layer_graphs.set_layer_graphs("off")
    eager = _step(model, cuda_ids(64, 0))
    assert tiled[0] == pytest.approx(eager[0], rel=1e-3)
    assert_grads_close(tiled[1], eager[1], atol=2e-4, rtol=2e-2)
