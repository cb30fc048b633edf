"""SFTTrainer / SFTConfig: TRL's, accepting the spellings Unsloth-era scripts use, with pronghorn's loss path.

Scripts written for older TRL pass ``tokenizer=``, ``max_seq_length=``, ``dataset_text_field=`` and
``packing=`` to the trainer; these are moved to where current TRL expects them (``processing_class``,
``SFTConfig.max_length``, ...) without touching TRL's source.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import transformers
import trl

from pronghorn.nn.lm_head_loss import collect_token_stats
from pronghorn.training.callbacks import LossLogCallback
from pronghorn.training.dataset_checks import check_sft_dataset
from pronghorn.training.optimizer_groups import embedding_param_groups
from pronghorn.training.token_metrics import labels_of, record_token_metrics, stats_from_logits

logger = logging.getLogger(__name__)

# Trainer keyword arguments that older TRL accepted and current TRL reads from SFTConfig.
_CONFIG_KWARGS = ("max_seq_length", "dataset_text_field", "packing", "dataset_num_proc", "dataset_kwargs",
                  "padding_free", "eos_token", "completion_only_loss", "assistant_only_loss")


@dataclass
class SFTConfig(trl.SFTConfig):
    """TRL's SFTConfig plus ``max_seq_length`` (alias of ``max_length``) and ``embedding_learning_rate``.

    ``embedding_learning_rate``: a separate (usually smaller) learning rate for ``embed_tokens`` and
    ``lm_head`` when they are trained (continued pretraining with ``modules_to_save``).
    """

    max_seq_length: int | None = field(default=None, metadata={"help": "Alias of max_length."})
    # pronghorn installs its own checkpointing in get_peft_model; TRL's default would replace it.
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Leave False: set checkpointing "
                                         "with get_peft_model(use_gradient_checkpointing=...)."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "Run each batch as one stream of real tokens (default on unless packing)."})
    overlong: str = field(default="truncate", metadata={
        "help": "Examples longer than max_length: 'truncate' (with a warning) or 'error'."})
    embedding_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate for embed_tokens / lm_head parameters (continued pretraining)."})

    def __post_init__(self):
        if self.max_seq_length is not None:
            self.max_length = self.max_seq_length
        self.max_seq_length = self.max_length
        if self.bf16 is None and not self.fp16:
            # TRL defaults to bf16 everywhere; that fails on CPUs and pre-Ampere GPUs, so ask the hardware.
            from pronghorn.models.dtypes import is_bfloat16_supported

            self.bf16 = is_bfloat16_supported()
        super().__post_init__()


def _as_sft_config(args, moved: dict) -> SFTConfig:
    if args is None:
        args = SFTConfig(output_dir="outputs")
    if not isinstance(args, SFTConfig):
        # A TrainingArguments or plain trl.SFTConfig: keep every value it has that SFTConfig knows.
        names = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in names}
        values.pop("max_seq_length", None)
        args = SFTConfig(**values)
    if moved:
        if "max_seq_length" in moved:
            moved["max_length"] = moved.pop("max_seq_length")
        args = dataclasses.replace(args, **moved, max_seq_length=None)
    return args


def _padding_free_collator(tokenizer, args: SFTConfig):
    """Our collator flattens the batch and enforces max_length itself; TRL must then neither pad nor
    truncate (it refuses padding_free=True with a max_length when not packing)."""
    from pronghorn.data.padding_free import PaddingFreeCollator

    collator = PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                   overlong=args.overlong)
    return collator, dataclasses.replace(args, padding_free=False, max_length=None, max_seq_length=None)


class SFTTrainer(trl.SFTTrainer):
    """trl.SFTTrainer that also accepts ``tokenizer=``, ``max_seq_length=``, ``dataset_text_field=``,
    ``packing=`` as keyword arguments, checks the dataset up front, writes a loss log and loss-curve PNG,
    and uses pronghorn's chunked loss when the model was patched by pronghorn. TRL's per-step
    ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are logged on that path too: the fused loss
    measures the first two in the same pass over each logits chunk."""

    def __init__(self, model=None, args=None, *pos, tokenizer=None, processing_class=None, **kwargs):
        moved = {k: kwargs.pop(k) for k in _CONFIG_KWARGS if k in kwargs}
        args = _as_sft_config(args, moved)
        if processing_class is None:
            processing_class = tokenizer
        if processing_class is None and model is not None and not isinstance(model, str):
            raise ValueError("SFTTrainer needs the tokenizer: pass processing_class=tokenizer (or tokenizer=...)")
        train_dataset = kwargs.get("train_dataset")
        skip_prepare = (args.dataset_kwargs or {}).get("skip_prepare_dataset", False)
        if train_dataset is not None and not skip_prepare:
            check_sft_dataset(train_dataset, args.dataset_text_field, kwargs.get("formatting_func"))
        if args.padding_free is None:
            # A vision-language processor means image batches, which TRL does not run padding-free.
            args.padding_free = not args.packing and not isinstance(processing_class, transformers.ProcessorMixin)
        if args.padding_free and not args.packing and kwargs.get("data_collator") is None \
                and processing_class is not None and hasattr(processing_class, "pad_token_id"):
            kwargs["data_collator"], args = _padding_free_collator(processing_class, args)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, LossLogCallback) for c in callbacks):
            callbacks.append(LossLogCallback())
        super().__init__(model, args, *pos, processing_class=processing_class, callbacks=callbacks, **kwargs)

    def _pronghorn_loss_active(self) -> bool:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        record = getattr(base, "_pronghorn_patch", None)
        return record is not None and any(kind == "lm_head_loss" for _, kind in record.patched)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        wants_logits = not model.training and self.compute_metrics is not None
        if self._pronghorn_loss_active() or wants_logits:
            # Our forward fuses the LM head with the loss in training and returns real logits in evaluation.
            # TRL's compute_loss, which logs entropy / mean_token_accuracy / num_tokens, is skipped here, so
            # those come from the fused loss's token statistics (or the logits) instead.
            inputs["use_cache"] = False
            labels, shift_labels = labels_of(inputs)
            with collect_token_stats() as stats:
                loss, outputs = transformers.Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                                  num_items_in_batch=num_items_in_batch)
            sums = stats.sums
            logits = getattr(outputs, "logits", None)
            if sums is None and logits is not None:
                sums = stats_from_logits(logits.detach(), labels, shift_labels)
            record_token_metrics(self, "train" if self.model.training else "eval", inputs, sums)
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None and getattr(self.args, "embedding_learning_rate", None):
            optimizer_cls, optimizer_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(self.args,
                                                                                               self.model)
            groups = embedding_param_groups(self.model, self.args.learning_rate, self.args.embedding_learning_rate,
                                            self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(*args, **kwargs)


# Unsloth's names for the same things, so ported scripts run unchanged.
UnslothTrainer = SFTTrainer
UnslothTrainingArguments = SFTConfig
