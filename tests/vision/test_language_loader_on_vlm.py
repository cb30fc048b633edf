"""FastLanguageModel on a multimodal checkpoint (Gemma 3 ships as one): it loads, patches only the
language model, and trains on image batches with the model's own loss path."""
import torch

from pronghorn import FastLanguageModel
from pronghorn.trainer import VisionDataCollator
from tests.vision.factories import mixed_examples, save_tiny_vlm, tiny_vlm


def test_fast_language_model_on_a_gemma3_vlm_checkpoint(tmp_path):
    save_tiny_vlm("gemma3", tmp_path)
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.config.get_text_config().pad_token_id == tokenizer.pad_token_id
    patched = {id(m) for m, _ in model._pronghorn_patch.patched}
    vision = [m for name, m in model.named_modules() if "vision" in name]
    assert vision and not any(id(m) in patched for m in vision)  # the SigLIP tower keeps its own forwards

    reference, processor = tiny_vlm("gemma3")
    batch = VisionDataCollator(reference, processor)(mixed_examples())
    model.train()
    reference.train()
    got = model(**batch).loss
    want = reference(**batch).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
