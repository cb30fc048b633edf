"""Gradient accumulation is exact: 1 x 16 accumulated == 16 x 1 == the loss over all tokens at once.

A real ``trl.SFTTrainer`` runs one optimizer step of plain SGD with lr 1 (no clipping, no weight
decay, no momentum), so the weight update equals minus the gradient. 16 examples of unequal
length; padding-free batching (pronghorn's collator) and TRL's packing; per-sequence sdpa.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from pronghorn.data.padding_free import PaddingFreeCollator
from pronghorn.nn.attention import VARLEN_SDPA, set_attention_implementation
from tests.factories import byte_bpe_tokenizer, tiny_model

LENGTHS = [5, 17, 9, 3, 12, 20, 7, 4, 15, 6, 11, 8, 19, 2, 13, 10]


def _data():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 500, (n,), generator=g).tolist() for n in LENGTHS]
    # Prompt tokens masked on some examples, so token counts differ from lengths.
    labels = [[-100] * (i % 3) + row[i % 3 :] for i, row in enumerate(ids)]
    return ids, labels


def _model():
    model = tiny_model("llama", num_hidden_layers=2).train()
    set_attention_implementation(model, VARLEN_SDPA)
    return model


def _reference_update(ids, labels):
    """Minus the gradient of (summed next-token CE over all examples / number of targets)."""
    model = _model()
    total, count = 0.0, 0
    for row, lab in zip(ids, labels):
        logits = model(input_ids=torch.tensor([row]), use_cache=False).logits[0, :-1]
        target = torch.tensor(lab[1:])
        total = total + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: -p.grad.clone() for n, p in model.named_parameters()}


def _trainer_update(tmp_path, batch_size, accumulation, packing):
    ids, labels = _data()
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, report_to="none", use_cpu=True, seed=0,
        gradient_checkpointing=False, save_strategy="no", dataloader_drop_last=False,
        packing=packing, max_length=32 if packing else None, padding_free=False, bf16=False, fp16=False,
    )
    collator = None if packing else PaddingFreeCollator(pad_token_id=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": labels}),
                         processing_class=byte_bpe_tokenizer(), data_collator=collator)
    trainer.train()
    loss = trainer.state.log_history[0]["loss"]
    return loss, {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("packing", [False, True], ids=["padding_free", "packing"])
def test_accumulation_matches_big_batch_and_reference(tmp_path, packing):
    ids, labels = _data()
    ref_loss, ref = _reference_update(ids, labels)
    # With packing, rows hold several examples; 16 accumulation steps of one row each still cover all of them.
    acc_loss, acc = _trainer_update(tmp_path / "acc", 1, 16, packing)
    big_loss, big = _trainer_update(tmp_path / "big", 16, 1, packing)
    for name in ref:
        torch.testing.assert_close(acc[name], ref[name], atol=1e-5, rtol=1e-5, msg=f"accumulated: {name}")
        torch.testing.assert_close(big[name], ref[name], atol=1e-5, rtol=1e-5, msg=f"big batch: {name}")
    # The Trainer logs the loss rounded to 4 significant decimals.
    assert acc_loss == pytest.approx(ref_loss, abs=1e-3) and big_loss == pytest.approx(ref_loss, abs=1e-3)
