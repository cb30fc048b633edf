"""pronghorn's SFTTrainer with the vision collator, configured as Unsloth's VLM notebooks do, on a list
dataset and on a streaming IterableDataset with max_steps."""
import pytest
import torch
from datasets import Dataset, IterableDataset

from pronghorn import FastVisionModel
from pronghorn.trainer import SFTConfig, SFTTrainer, UnslothVisionDataCollator
from tests.vision.factories import mixed_examples, save_tiny_vlm


def _config(tmp_path, **kwargs):
    return SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, report_to="none", save_strategy="no", remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, dataset_text_field="", max_length=256,
                     **kwargs)


def _arrow_rows():
    """mixed_examples() laid out as a datasets table needs: every content a list of parts, images in the
    'images' column (an Arrow column cannot mix strings and lists, nor hold images inside parts)."""
    rows = []
    for example in mixed_examples():
        images, messages = list(example.get("images", [])), []
        for message in example["messages"]:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = []
            for part in content:
                if part["type"] == "image" and part.get("image") is not None:
                    images.append(part["image"])
                parts.append({"type": part["type"], "text": part.get("text")})
            messages.append({"role": message["role"], "content": parts})
        rows.append({"messages": messages, "images": images})
    return rows


def _generator():
    while True:
        yield from mixed_examples()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))
    model, processor = FastVisionModel.from_pretrained(str(path), max_seq_length=256)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    return model, processor


@pytest.mark.parametrize("streaming", [False, True], ids=["list", "streaming"])
def test_trainer_runs_vision_batches_and_lowers_the_loss(loaded, tmp_path, streaming):
    model, processor = loaded
    collator = UnslothVisionDataCollator(model, processor, train_on_responses_only=True)
    if streaming:
        dataset = IterableDataset.from_generator(_generator)
        config = _config(tmp_path, max_steps=12)
    else:
        dataset = Dataset.from_list(_arrow_rows() * 3)  # parts become structs with null keys
        config = _config(tmp_path, max_steps=12)
    trainer = SFTTrainer(model=model, tokenizer=processor, data_collator=collator, train_dataset=dataset,
                         args=config)
    assert trainer.data_collator is collator, "a user-given data collator must be kept"
    assert trainer._pronghorn_loss_active()
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert result.global_step == 12
