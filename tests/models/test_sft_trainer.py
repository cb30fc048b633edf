"""TRL integration as users call it: text and conversational data, old spellings, resume, eval logits, callbacks,
and the token metrics TRL logs."""
import collections
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import EarlyStoppingCallback, TrainingArguments

from pronghorn import FastLanguageModel, SFTConfig, SFTTrainer, UnslothTrainer, UnslothTrainingArguments
from pronghorn.training.token_metrics import record_token_metrics
from tests.factories import save_tiny

TEXTS = [f"Example number {i}: the quick brown fox jumps over the lazy dog." for i in range(24)]
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("base"))


def _model(base_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(str(base_dir), max_seq_length=64)
    tokenizer.chat_template = CHATML
    return FastLanguageModel.get_peft_model(model, r=8), tokenizer


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
                logging_steps=1, report_to="none", save_steps=3, seed=0)
    return SFTConfig(**{**base, **kw})


def test_text_dataset_with_old_spellings(base_dir, tmp_path):
    model, tokenizer = _model(base_dir)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=Dataset.from_dict({"body": TEXTS}),
                         dataset_text_field="body", max_seq_length=48, packing=False,
                         args=TrainingArguments(output_dir=str(tmp_path), max_steps=4, report_to="none", logging_steps=1,
                                                per_device_train_batch_size=4, learning_rate=5e-3))
    # padding-free by default: our collator enforces max_seq_length, so TRL itself neither pads nor truncates
    assert trainer.data_collator.max_length == 48 and trainer.args.dataset_text_field == "body"
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(np.isfinite(losses))
    assert (tmp_path / "loss_log.jsonl").exists() and (tmp_path / "loss_curve.png").exists()


def test_conversational_dataset_and_resume(base_dir, tmp_path):
    model, tokenizer = _model(base_dir)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(CHATS),
                         args=_args(tmp_path))
    trainer.train()
    assert (tmp_path / "checkpoint-6").is_dir()
    model2, tokenizer2 = _model(base_dir)
    resumed = SFTTrainer(model=model2, processing_class=tokenizer2, train_dataset=Dataset.from_list(CHATS),
                         args=_args(tmp_path, max_steps=9))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 9
    steps = [e["step"] for e in resumed.state.log_history if "loss" in e]
    # the history restored from checkpoint-6 plus steps 7-9; a restart would repeat steps 1-6
    assert steps == list(range(1, 10)), steps


def test_eval_logits_reach_compute_metrics_and_early_stopping(base_dir, tmp_path):
    model, tokenizer = _model(base_dir)
    seen = {}

    def compute_metrics(pred):
        seen["shape"] = np.asarray(pred.predictions).shape
        return {"n": float(np.asarray(pred.predictions).size)}

    data = Dataset.from_list(CHATS)
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=data, eval_dataset=data.select(range(4)),
        compute_metrics=compute_metrics, callbacks=[EarlyStoppingCallback(early_stopping_patience=1)],
        args=_args(tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="eval_loss", per_device_eval_batch_size=2),
    )
    trainer.train()
    assert seen["shape"][-1] == model.config.vocab_size, seen


def test_embedding_learning_rate_groups(base_dir, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(base_dir), max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, modules_to_save=["lm_head", "embed_tokens"])
    trainer = UnslothTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": TEXTS}),
                             args=UnslothTrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none",
                                                           learning_rate=1e-3, embedding_learning_rate=1e-4))
    trainer.create_optimizer()
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [1e-4, 1e-3]
    embedding_group = next(g for g in trainer.optimizer.param_groups if g["lr"] == 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(("embed_tokens" in names[id(p)] or "lm_head" in names[id(p)]) for p in embedding_group["params"])
    trainer.train()


@pytest.mark.parametrize("report_to", ["tensorboard"])
def test_report_to(base_dir, tmp_path, report_to):
    model, tokenizer = _model(base_dir)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         args=_args(tmp_path, max_steps=2, report_to=report_to))
    trainer.train()
    assert any(tmp_path.rglob("events.out.tfevents*")), sorted(p.name for p in tmp_path.rglob("*"))


def _trained(base_dir, tmp_path, fast_paths):
    model, tokenizer = FastLanguageModel.from_pretrained(str(base_dir), max_seq_length=64, fast_paths=fast_paths)
    model = FastLanguageModel.get_peft_model(model, r=8)
    data = Dataset.from_dict({"text": TEXTS})
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, eval_dataset=data.select(range(8)),
                         args=_args(tmp_path, max_steps=2, save_steps=10, eval_strategy="steps", eval_steps=2,
                                    per_device_eval_batch_size=4))
    trainer.train()
    return trainer


def test_token_metrics_logged_with_fused_loss_match_trl(base_dir, tmp_path):
    # TRL logs entropy, mean_token_accuracy and num_tokens from the logits; pronghorn's fused loss has
    # none, so it measures them in the loss kernel. Same model, data and seed: the logs must agree.
    ours = _trained(base_dir, tmp_path / "fused", fast_paths=True)
    trl = _trained(base_dir, tmp_path / "trl", fast_paths=False)
    assert ours._pronghorn_loss_active() and not trl._pronghorn_loss_active()
    for key in ("entropy", "mean_token_accuracy", "num_tokens", "eval_entropy", "eval_mean_token_accuracy"):
        got = [e[key] for e in ours.state.log_history if key in e]
        want = [e[key] for e in trl.state.log_history if key in e]
        assert got and len(got) == len(want), (key, ours.state.log_history)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=key)
    first = next(e for e in ours.state.log_history if "entropy" in e)
    assert 0 < first["entropy"] <= np.log(ours.model.config.vocab_size) + 1e-6
    assert 0 <= first["mean_token_accuracy"] <= 1 and first["num_tokens"] > 0


def test_token_metrics_without_stats_warn_once_and_still_count_tokens(caplog):
    metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer = SimpleNamespace(_metrics=metrics, _total_train_tokens=0,
                              accelerator=SimpleNamespace(reduce=lambda t, reduction: t.clone()))
    flat = {"position_ids": torch.arange(10)[None]}  # a padding-free batch: one row of 10 tokens
    with caplog.at_level(logging.WARNING, logger="pronghorn.training.token_metrics"):
        record_token_metrics(trainer, "train", flat, None)
        record_token_metrics(trainer, "train", {"attention_mask": torch.ones(2, 3)}, None)
    assert sum("neither token statistics" in r.message for r in caplog.records) == 1
    assert "entropy" not in metrics["train"] and metrics["train"]["num_tokens"] == [16]
    record_token_metrics(trainer, "eval", flat, torch.tensor([4.0, 1.0, 10.0]))
    record_token_metrics(trainer, "eval", flat, torch.zeros(3))  # no label tokens: 0, not NaN
    assert metrics["eval"]["entropy"] == [2.5, 0.0] and metrics["eval"]["mean_token_accuracy"] == [0.25, 0.0]
    assert metrics["eval"]["num_tokens"] == [16]  # evaluation does not add to the training count
