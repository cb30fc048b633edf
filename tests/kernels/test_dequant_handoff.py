"""Dense copies of 4-bit weights handed from a checkpointed layer's recompute to its backward (dequant.handoff)."""
from __future__ import annotations

import pytest
import torch

from pronghorn.kernels.dequant import handoff, weights
from pronghorn.memory import offloaded_checkpoint
from pronghorn.nn.lora import fused_mlp_forward
from tests.kernels.test_lora import _nf4_mlp, _run, _x


def test_kept_only_while_collecting_and_handed_out_once():
    w, dense = torch.empty(1), torch.ones(2)
    handoff.offer(w, torch.float32, dense)  # no scope open: nothing kept
    assert handoff.take(w, torch.float32) is None
    with handoff.recompute_to_backward() as scope:
        handoff.offer(w, torch.float32, dense)
        assert handoff.take(w, torch.bfloat16) is None  # another dtype is another copy
        scope.collecting = False
        handoff.offer(w, torch.bfloat16, dense)  # backward's own dequantizations are not kept
        assert handoff.take(w, torch.float32) is dense
        assert handoff.take(w, torch.float32) is None
        assert handoff.take(w, torch.bfloat16) is None
        scope.collecting = True
        handoff.offer(w, torch.float32, dense)
    with handoff.recompute_to_backward():
        assert handoff.take(w, torch.float32) is None  # a scope starts empty and drops what it kept


def test_keeps_copies_in_order_until_the_byte_budget_is_spent(monkeypatch):
    monkeypatch.setattr(handoff, "KEEP_BYTES", 100)
    ws = [torch.empty(1) for _ in range(3)]
    with handoff.recompute_to_backward():
        handoff.offer(ws[0], torch.float32, torch.zeros(20))  # 80 bytes
        handoff.offer(ws[1], torch.float32, torch.zeros(10))  # 40 more: over the budget, not kept
        handoff.offer(ws[2], torch.float32, torch.zeros(5))  # 20 more: fits
        assert [handoff.take(w, torch.float32) is not None for w in ws] == [True, False, True]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offloaded_layer_dequantizes_each_weight_once_for_recompute_and_backward(device, monkeypatch):
    """An NF4 MLP under offloaded checkpointing: the recompute's dense weights serve its backward (3 dequantizations
    fewer than recompute + backward each making their own), and the gradients are those without checkpointing.
    On CUDA the autograd engine runs backward on its own thread and the layer input goes through host memory."""
    calls = []
    dequantize = weights._dequantize
    monkeypatch.setattr(weights, "_dequantize", lambda w, dtype: calls.append(id(w)) or dequantize(w, dtype))
    mlp = _nf4_mlp(64, 128, torch.float32, device=device)

    def fused(t):
        return fused_mlp_forward(mlp, t, "swiglu", fallback=lambda _: None)

    x = _x((2, 5, 64), torch.float32).to(device)
    plain = _run(fused, x, mlp)
    assert len(calls) == 6  # forward: gate, up, down; backward: down (dh), gate and up (dx)
    calls.clear()
    checkpointed = _run(lambda t: offloaded_checkpoint(fused, t), x, mlp)
    assert len(calls) == 6 and len(set(calls)) == 3  # forward 3, recompute 3, backward none
    for got, want in zip(checkpointed, plain):
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=0, rtol=0)
        else:
            torch.testing.assert_close(got, want, atol=0, rtol=0)
