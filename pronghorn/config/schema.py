"""TrainConfig: the one typed configuration behind ``pronghorn train`` and its YAML files.

Keys are named like Unsloth's CLI arguments, so a command line and a YAML file use the same words.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# The embedded model is a ~1M-parameter random-init demo: at the defaults meant for real LLMs (60 steps at 2e-4)
# it learns no more than to stop at once, so its own defaults give it enough steps to learn the answer format.
EMBEDDED_MODEL_DEFAULTS = {"max_steps": 300, "learning_rate": 2e-3}


@dataclass
class TrainConfig:
    # model
    model_name: str | None = _help("Hub name or local path; empty = the small model embedded in pronghorn",
                                   default=None)
    max_seq_length: int = _help("Longest training sequence in tokens", default=2048)
    dtype: str | None = _help("bfloat16 | float16 | float32; empty = best for this machine", default=None)
    load_in_4bit: bool = _help("Load base weights in 4-bit NF4 (QLoRA)", default=False)
    load_in_8bit: bool = _help("Load base weights in 8-bit", default=False)
    full_finetuning: bool = _help("Train all weights instead of LoRA adapters", default=False)
    trust_remote_code: bool = _help("Allow model code from the Hub", default=False)
    # LoRA
    r: int = _help("LoRA rank", default=16)
    lora_alpha: int = _help("LoRA alpha", default=16)
    lora_dropout: float = _help("LoRA dropout (0 takes the fused path)", default=0.0)
    bias: str = _help("none | all | lora_only", default="none")
    target_modules: list[str] = _help("Layers to adapt, or all-linear", default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    use_rslora: bool = _help("Rank-stabilised LoRA scaling", default=False)
    use_gradient_checkpointing: str = _help("unsloth (offload to CPU) | true | false", default="unsloth")
    random_state: int = _help("Seed", default=3407)
    # data
    dataset: str | None = _help("Dataset file (json/jsonl/csv/parquet) or Hub name; empty = embedded default",
                                default=None)
    dataset_split: str = _help("Split to train on", default="train")
    dataset_text_field: str = _help("Column holding plain text (when there is no 'messages' column)",
                                    default="text")
    chat_template: str | None = _help("Registered chat template to apply (see pronghorn templates)", default=None)
    train_on_responses_only: bool = _help("Only assistant tokens carry loss", default=False)
    packing: bool = _help("Pack short examples into full rows", default=False)
    # training
    per_device_train_batch_size: int = _help("Examples per device per step", default=2)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step", default=4)
    max_steps: int = _help("Optimizer steps (-1: train num_train_epochs; embedded model: 300)", default=60)
    num_train_epochs: float = _help("Epochs when max_steps is -1", default=1.0)
    learning_rate: float = _help("Peak learning rate (embedded model: 2e-3)", default=2e-4)
    embedding_learning_rate: float | None = _help("Separate lr for embed_tokens/lm_head", default=None)
    warmup_steps: int = _help("Linear warm-up steps", default=5)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    lr_scheduler_type: str = _help("linear | cosine | constant ...", default="linear")
    optim: str = _help("Optimizer name as in transformers (adamw_torch, adamw_8bit, ...)", default="adamw_torch")
    logging_steps: int = _help("Log every N steps", default=1)
    save_steps: int = _help("Checkpoint every N steps", default=50)
    seed: int = _help("Training seed", default=3407)
    report_to: str = _help("none | tensorboard | wandb | trackio", default="none")
    resume_from_checkpoint: bool = _help("Resume from the newest checkpoint in output_dir", default=False)
    # output
    output_dir: str = _help("Where checkpoints, adapter, logs and the merged model go", default="outputs")
    save_method: str = _help("lora | merged_16bit | merged_4bit", default="merged_16bit")
    save_gguf: str | None = _help("Also write GGUF with this quantization (q8_0, f16, q4_k_m ...)", default=None)
    eval_prompt: str | None = _help("Prompt answered before and after training to show the effect",
                                    default=None)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
