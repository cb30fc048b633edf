"""A training step of a patched model never makes the host wait for the GPU: after each wait the GPU idles until
Python has queued more work (the packed-sequence checks at the start of the forward pass cost that every step)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pronghorn import FastLanguageModel
from pronghorn.kernels.cross_entropy.label_check import SYNC_CHECKS
from pronghorn.nn.attention import _segment_lengths
from pronghorn.nn.positions import holds_one_sequence_per_row, one_sequence_positions, skip_known_packed_checks
from tests.factories import save_tiny


class _CountHostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every ``.item()``, ``bool()``, ``int()`` of a tensor goes through it."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_counter_sees_a_host_read():
    with _CountHostReads() as counter:
        bool((torch.arange(3) == 1).any())
    assert counter.reads == 1


def test_marked_positions_and_their_views():
    pos = one_sequence_positions(6, "cpu")
    assert pos.tolist() == [list(range(6))]
    assert holds_one_sequence_per_row(pos)
    assert holds_one_sequence_per_row(pos.expand(3, -1))
    # Anything that is not the whole row repeated must still be looked at.
    assert not holds_one_sequence_per_row(pos[:, 1:])
    assert not holds_one_sequence_per_row(pos[:, ::2])
    assert not holds_one_sequence_per_row(pos.clone())
    assert not holds_one_sequence_per_row(torch.arange(6).unsqueeze(0))
    assert not holds_one_sequence_per_row(None)


def test_packed_checks_skip_only_marked_positions():
    from transformers import masking_utils

    skip_known_packed_checks()
    skip_known_packed_checks()  # idempotent: one wrapper
    find = masking_utils.find_packed_sequence_indices
    assert not getattr(find.__wrapped__, "_pronghorn_wrapped", False)
    with _CountHostReads() as counter:
        assert find(one_sequence_positions(5, "cpu").expand(2, -1)) is None
        assert _segment_lengths(one_sequence_positions(5, "cpu"), 2, 5) == [[5], [5]]
    assert counter.reads == 0
    packed = torch.tensor([[0, 1, 2, 0, 1]])
    assert find(packed).tolist() == [[0, 0, 0, 1, 1]]
    assert _segment_lengths(packed, 1, 5) == [[3, 2]]


def _model(path, device, dtype):
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=64, dtype=dtype)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False, use_gradient_checkpointing="unsloth")
    return model.to(device).train()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def test_patched_step_reads_nothing_back(tiny_dir):
    model = _model(tiny_dir, "cpu", torch.float32)
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    with _CountHostReads() as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert counter.reads == 0


def test_own_positions_give_the_models_loss(tiny_dir):
    """Without position ids or a mask the fast path passes its own (marked) positions: same loss as with the
    mask and positions spelled out."""
    model = _model(tiny_dir, "cpu", torch.float32)
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    spelled = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids),
                    position_ids=torch.arange(16).expand(2, -1)).loss
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, spelled)


@pytest.mark.gpu
def test_cuda_training_step_never_syncs(tiny_dir):
    model = _model(tiny_dir, "cuda", torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    ids = torch.randint(5, 500, (2, 256), generator=torch.Generator().manual_seed(0)).pin_memory()

    def step():
        batch = ids.to("cuda", non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(SYNC_CHECKS + 1):  # the label check reads its first calls' answers at once
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
