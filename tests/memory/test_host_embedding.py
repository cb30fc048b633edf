"""Frozen input embeddings in host memory: the same lookups, losses and gradients, the same saved tensors, and
clear refusals where the table must stay on the GPU."""
import pytest
import torch
from torch import nn

from pronghorn import FastLanguageModel
from pronghorn.memory import host_embedding
from pronghorn.memory.host_embedding import (
    HostEmbedding,
    offload_input_embeddings,
    restore_input_embeddings,
)
from tests.factories import save_tiny, tiny_model
from tests.memory._util import assert_grads_close, trainable_grads


def _lora(path, offload: bool, device="cpu"):
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=64, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model.to(device), r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False, offload_embedding=offload)
    return model.train()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def _move_to_host(model):
    """What offload_input_embeddings does, minus its GPU-only condition (these tests run on the CPU too)."""
    base = model.get_base_model()
    base.set_input_embeddings(HostEmbedding(base.get_input_embeddings()))


def test_lookups_equal_the_embedding_and_keep_the_state_dict_key():
    emb = nn.Embedding(50, 12, padding_idx=0)
    host = HostEmbedding(emb)
    ids = torch.tensor([[0, 49, 7], [3, 3, 1]])
    torch.testing.assert_close(host(ids), emb(ids), atol=0, rtol=0)
    assert list(host.state_dict()) == ["weight"] and not list(host.parameters())
    assert host.weight.device.type == "cpu" and host.padding_idx == 0
    assert host.weight.is_pinned() == torch.cuda.is_available()  # registered in place where CUDA is


def test_module_to_changes_dtype_and_output_device_but_not_where_the_table_lives():
    host = HostEmbedding(nn.Embedding(20, 8))
    host.to(torch.float16)
    assert host.weight.dtype == torch.float16 and host.weight.device.type == "cpu"
    assert host.output_device.type == "cpu"
    if torch.cuda.is_available():
        host.cuda()
        assert host.weight.device.type == "cpu" and host.output_device.type == "cuda"
        assert host(torch.tensor([1, 2])).device.type == "cuda"


def test_a_token_id_outside_the_table_is_named():
    host = HostEmbedding(nn.Embedding(20, 8))
    with pytest.raises(ValueError, match=r"token id 20 is outside the input embedding table of 20 rows"):
        host(torch.tensor([[1, 20]]))
    with pytest.raises(ValueError, match=r"token id -3 .*resize_token_embeddings"):
        host(torch.tensor([[-3, 2]]))


def test_loss_gradients_and_saved_tensors_equal_the_gpu_table(tiny_dir):
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = _lora(tiny_dir, offload=False)
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_state = reference.get_base_model().state_dict()

    model = _lora(tiny_dir, offload=False)
    _move_to_host(model)
    assert model.device == reference.device  # Hugging Face reads it from the first parameter
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert_grads_close(trainable_grads(model), trainable_grads(reference), atol=0, rtol=0)
    state = model.get_base_model().state_dict()
    assert list(state) == list(ref_state)
    torch.testing.assert_close(state["model.embed_tokens.weight"], ref_state["model.embed_tokens.weight"])


def test_restore_puts_the_table_back_as_an_embedding(tiny_dir):
    model = _lora(tiny_dir, offload=False)
    table = model.get_input_embeddings().weight.detach().clone()
    _move_to_host(model)
    assert restore_input_embeddings(model)
    emb = model.get_input_embeddings()
    assert type(emb) is nn.Embedding and not emb.weight.requires_grad
    torch.testing.assert_close(emb.weight, table, atol=0, rtol=0)
    assert not restore_input_embeddings(model)


@pytest.mark.parametrize("case,reason", [
    ("tied", "tied to the LM head"),
    ("trained", "it is trained"),
    ("cpu", "not on a GPU"),
    ("scaled", "GemmaTextScaledWordEmbedding is not a plain nn.Embedding"),
])
def test_tables_that_must_stay_on_the_gpu_stay(case, reason, caplog):
    model = tiny_model("gemma") if case == "scaled" else tiny_model("llama", tie_word_embeddings=case == "tied")
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(case == "trained")
    with caplog.at_level("INFO", logger=host_embedding.__name__):
        assert not offload_input_embeddings(model)
    assert reason in caplog.text
    assert model.get_input_embeddings() is emb


def test_the_switch_reads_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(host_embedding.ENV, raising=False)
    assert host_embedding.offload_enabled() and not host_embedding.offload_enabled(False)
    monkeypatch.setenv(host_embedding.ENV, "0")
    assert not host_embedding.offload_enabled() and host_embedding.offload_enabled(True)


@pytest.mark.gpu
def test_get_peft_model_moves_the_table_and_trains_the_same(tiny_dir):
    ids = torch.randint(5, 500, (2, 32), generator=torch.Generator().manual_seed(2)).cuda()
    grown = []
    for offload in (False, True):
        before = torch.cuda.memory_allocated()
        loaded = _lora(tiny_dir, offload=offload, device="cuda")
        grown.append(torch.cuda.memory_allocated() - before)
    reference, model = _lora(tiny_dir, offload=False, device="cuda"), loaded
    emb = model.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb.weight.is_pinned()
    assert grown[0] - grown[1] >= emb.weight.numel() * emb.weight.element_size()
    model.to("cuda")  # what a Trainer does: the table stays in host memory
    assert model.get_input_embeddings().weight.device.type == "cpu"
    for m in (reference, model):
        m(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss,
                               atol=0, rtol=0)
    assert_grads_close(trainable_grads(model), trainable_grads(reference), atol=0, rtol=0)


def test_a_deep_copy_looks_up_the_same_rows():
    """Reference models (DPO) are deep copies: the copy's table is plain host memory, looked up all the same."""
    import copy

    host = HostEmbedding(nn.Embedding(30, 8))
    twin = copy.deepcopy(host)
    ids = torch.tensor([[3, 29, 0]])
    torch.testing.assert_close(twin(ids), host(ids), atol=0, rtol=0)
    host.unlock()
    host.unlock()  # idempotent
    torch.testing.assert_close(host(ids), twin(ids), atol=0, rtol=0)
