"""``pronghorn train``: load, adapt, train, save, and show the effect on a held-out prompt."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pronghorn.config.loading import config_from_args
from pronghorn.config.schema import TrainConfig

logger = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_training_dataset(config: TrainConfig):
    """The user's dataset file or hub name, or the embedded default conversations."""
    from pronghorn.data import load_dataset_file

    if config.dataset is None:
        return load_dataset_file(ASSETS / "default_dataset.jsonl", split="train")
    if os.path.exists(config.dataset):
        return load_dataset_file(config.dataset, split=config.dataset_split)
    from datasets import load_dataset

    return load_dataset(config.dataset, split=config.dataset_split)


def default_eval_prompts(config: TrainConfig) -> list[str]:
    if config.eval_prompt:
        return [config.eval_prompt]
    if config.model_name is None:
        return json.loads((ASSETS / "held_out_prompts.json").read_text())[:2]
    return []


def run_training(config: TrainConfig) -> dict:
    """Run one fine-tune described by ``config``; returns a summary (also written to output_dir/summary.json)."""
    from pronghorn.inference.generate import chat_reply
    from pronghorn.models.fast_language_model import FastLanguageModel
    from pronghorn.training.sft import SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(
        config.model_name, max_seq_length=config.max_seq_length, dtype=config.dtype,
        load_in_4bit=config.load_in_4bit, load_in_8bit=config.load_in_8bit,
        full_finetuning=config.full_finetuning, trust_remote_code=config.trust_remote_code,
        use_gradient_checkpointing=config.use_gradient_checkpointing,
    )
    if config.chat_template:
        from pronghorn.data import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=config.chat_template)
    dataset = load_training_dataset(config)
    prompts = default_eval_prompts(config)
    before = {p: chat_reply(model, tokenizer, p, max_new_tokens=24) for p in prompts}
    if not config.full_finetuning and not hasattr(model, "peft_config"):
        model = FastLanguageModel.get_peft_model(
            model, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias=config.bias,
            target_modules=config.target_modules, use_rslora=config.use_rslora,
            use_gradient_checkpointing=config.use_gradient_checkpointing, random_state=config.random_state,
            max_seq_length=config.max_seq_length,
        )
    args = SFTConfig(
        output_dir=config.output_dir, per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs, learning_rate=config.learning_rate,
        embedding_learning_rate=config.embedding_learning_rate, warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay, lr_scheduler_type=config.lr_scheduler_type, optim=config.optim,
        logging_steps=config.logging_steps, save_steps=config.save_steps, seed=config.seed,
        report_to=config.report_to, max_length=config.max_seq_length, packing=config.packing,
        dataset_text_field=config.dataset_text_field, save_total_limit=2,
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    if config.train_on_responses_only:
        from pronghorn.data import train_on_responses_only

        trainer = train_on_responses_only(trainer)
    result = trainer.train(resume_from_checkpoint=True if config.resume_from_checkpoint else None)
    out = Path(config.output_dir)
    saved = save_outputs(model, tokenizer, config, out)
    after = {p: chat_reply(model, tokenizer, p, max_new_tokens=24) for p in prompts}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "model": config.model_name or "embedded default", "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "train_runtime_s": result.metrics.get("train_runtime"), "saved": saved,
        "answers_before": before, "answers_after": after,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_outputs(model, tokenizer, config: TrainConfig, out: Path) -> dict[str, str]:
    saved = {}
    if hasattr(model, "peft_config"):
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        saved["adapter"] = str(out / "adapter")
    if config.save_method != "lora" or config.full_finetuning:
        method = "merged_16bit" if config.full_finetuning else config.save_method
        model.save_pretrained_merged(out / "merged", tokenizer, save_method=method, overwrite=True)
        saved["merged"] = str(out / "merged")
    if config.save_gguf:
        model.save_pretrained_gguf(out / "gguf", tokenizer, quantization_method=config.save_gguf, overwrite=True)
        saved["gguf"] = str(out / "gguf")
    for name in ("loss_log.jsonl", "loss_curve.png"):
        if (out / name).exists():
            saved[name.split(".")[0]] = str(out / name)
    return saved


def train_command(args) -> int:
    config = config_from_args(args)
    summary = run_training(config)
    print(f"\nTrained {summary['steps']} steps: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    for prompt, answer in summary["answers_before"].items():
        print(f"\n> {prompt}\n  before: {answer!r}\n  after:  {summary['answers_after'][prompt]!r}")
    for kind, path in summary["saved"].items():
        print(f"{kind}: {path}")
    return 0
