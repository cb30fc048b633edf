"""Stashed MLP gate outputs (pronghorn.memory.stash): the recompute takes them instead of re-running the gate
GEMM, and the gradients stay those of an unpatched model without checkpointing."""
import pytest
import torch

from pronghorn.kernels.lora import projection
from pronghorn.memory import stash as stash_module
from tests.memory._util import assert_grads_close, trainable_grads


@pytest.fixture
def stashed_layers():
    def set_layers(n):
        stash_module.set_stashed_layers(n)

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
                        lambda x2, parts, xas, dtype: computed.append(len(parts)) or project(x2, parts, xas, dtype))
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


def _unparked_init(self, tensor, link=True, keep_on_device=True):
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
    monkeypatch.setattr(offload, "copies_in_flight_bytes", lambda: 33)
    stash.put("mlp", [gate, gate])
    assert stash.take("mlp") is None  # the recompute computes the gate itself
    monkeypatch.setattr(offload, "copies_in_flight_bytes", lambda: 32)
    stash.put("mlp", [gate, gate])
    assert stash.take("mlp") is not None


def test_parked_and_skipped_layers_are_counted(monkeypatch):
    from pronghorn.memory import offload

    monkeypatch.setitem(stash_module.STATS, "parked", 0)
    monkeypatch.setitem(stash_module.STATS, "skipped", 0)
    stash = stash_module.LayerStash()
    stash.put("mlp", [torch.ones(4), torch.ones(4)])
    monkeypatch.setattr(offload, "copies_in_flight_bytes", lambda: 10**9)
    stash.put("mlp", [torch.ones(4), torch.ones(4)])
    assert stash_module.STATS == {"parked": 1, "skipped": 1}


def test_layer_count_must_not_be_negative():
    with pytest.raises(ValueError, match="must be >= 0"):
        stash_module.set_stashed_layers(-1)


@pytest.mark.gpu
def test_cuda_stash_gives_the_gradients_of_the_plain_recompute(stashed_layers, tmp_path):
    """On CUDA the stash goes through pinned host memory on the side stream and back."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tests.factories import save_tiny

    path = save_tiny("llama", tmp_path / "llama", num_hidden_layers=3)
    ids = torch.randint(5, 500, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    grads = []
    for layers in (0, 2):
        stashed_layers(layers)
        model = _load(path, True, "unsloth").cuda()
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(trainable_grads(model))
    assert_grads_close(grads[1], grads[0], atol=0, rtol=0)  # the same values, fetched instead of recomputed
