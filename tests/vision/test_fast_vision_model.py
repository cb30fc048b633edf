"""FastVisionModel on tiny random-init models of every family: LoRA targets from the finetune_* switches,
4-bit skip lists, fast paths vs Hugging Face (loss and LoRA gradients), 20 training steps, save -> reload."""
import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.quantizers.quantizers_utils import should_convert_module

from pronghorn import FastVisionModel, VisionDataCollator, unpatch_model
from pronghorn.config.validation import ConfigError
from pronghorn.models.vision.families import (
    quant_skip_modules,
    resolve_paths,
    vision_spec_for_model,
)
from pronghorn.models.vision.patching import patch_vision_model
from pronghorn.models.vision.targets import classify_linear_layers
from pronghorn.nn.attention import POLICY_SDPA, register_policy_sdpa
from tests.vision.factories import (
    NO_PROCESSOR_HERE,
    PROCESSOR_FAMILIES,
    VLM_FAMILIES,
    mixed_examples,
    pixtral_manual_batch,
    sample_image,
    save_tiny_vlm,
    tiny_processor,
    tiny_vlm_model,
)


def _batch(family):
    if family in NO_PROCESSOR_HERE:
        return pixtral_manual_batch(family)
    return VisionDataCollator(None, tiny_processor(family))(mixed_examples())


def _lora(model, **kwargs):
    kwargs.setdefault("use_gradient_checkpointing", False)
    return FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, **kwargs)


def _lora_names(peft_model):
    return [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]


# ------------------------------------------------------------------------------------------ LoRA targets


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_switches_choose_parts_and_kinds(family):
    model = tiny_vlm_model(family)
    spec = vision_spec_for_model(model)
    layers = {layer.name: layer for layer in classify_linear_layers(model, spec)}
    assert {"vision", "language"} <= {layer.part for layer in layers.values()}, layers
    cases = [
        ({}, lambda layer: layer.part in ("vision", "projector", "language")),
        ({"finetune_vision_layers": False}, lambda layer: layer.part == "language"),
        ({"finetune_language_layers": False}, lambda layer: layer.part in ("vision", "projector")),
        ({"finetune_mlp_modules": False}, lambda layer: layer.kind == "attention"),
        ({"finetune_attention_modules": False}, lambda layer: layer.kind == "mlp"),
    ]
    for switches, wanted in cases:
        peft_model = _lora(copy.deepcopy(model), **switches)
        adapted = {name.removeprefix("base_model.model.") for name in _lora_names(peft_model)}
        expected = {name for name, layer in layers.items() if wanted(layer)}
        assert adapted == expected, (family, switches, sorted(adapted ^ expected))
        assert not any(name.endswith("lm_head") for name in adapted)


def test_switches_that_select_nothing_are_refused():
    model = tiny_vlm_model("qwen2_vl")
    with pytest.raises(ConfigError, match="leave nothing to train"):
        _lora(model, finetune_vision_layers=False, finetune_language_layers=False)
    with pytest.raises(ConfigError, match="leave nothing to train"):
        _lora(model, finetune_attention_modules=False, finetune_mlp_modules=False)


def test_explicit_target_modules_are_used_as_given():
    peft_model = _lora(tiny_vlm_model("gemma3"), target_modules=["q_proj", "v_proj"])
    leaves = {name.rsplit(".", 1)[-1] for name in _lora_names(peft_model)}
    assert leaves == {"q_proj", "v_proj"}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_4bit_skip_list_keeps_projector_and_output_layer(family):
    model = tiny_vlm_model(family)
    skip = quant_skip_modules(model.config)
    layers = classify_linear_layers(model, vision_spec_for_model(model))
    spec = vision_spec_for_model(model)
    # Gemma 3's projector holds a bare weight, not a Linear: check the projector modules themselves too.
    projector = [layer.name for layer in layers if layer.part == "projector"] + resolve_paths(model, spec.projector)
    assert projector, f"{family}: no projector found"
    for name in projector + ["lm_head"]:
        assert not should_convert_module(name, skip), f"{family}: {name} would be quantized ({skip})"
    for layer in layers:
        if layer.part == "language":
            assert should_convert_module(layer.name, skip), f"{family}: {layer.name} would stay 16-bit"


# ------------------------------------------------------------------------------------------ fast paths


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_fast_paths_match_hugging_face_loss_and_lora_grads(family):
    ref = tiny_vlm_model(family)
    fast = copy.deepcopy(ref)
    register_policy_sdpa()
    fast.set_attn_implementation(POLICY_SDPA)  # what FastVisionModel picks on CUDA: sdpa under the backend policy
    assert fast.config.get_text_config()._attn_implementation == POLICY_SDPA
    record = patch_vision_model(fast)
    summary = record.summary()
    assert summary.get("lm_head_loss") == 1 and summary.get("norm", 0) >= 5 and summary.get("mlp", 0) >= 2, summary
    # Multimodal RoPE (Qwen-VL) and cross-attention (Mllama) keep Hugging Face's attention.
    expects_attention = vision_spec_for_model(ref).fast_attention
    assert ("attention" in summary) == expects_attention, summary
    # Towers that pack all images into one stream take one varlen attention call per layer.
    assert ("vision_attention" in summary) == vision_spec_for_model(ref).packed_vision_tower, summary
    ref, fast = (_lora(m, init_lora_weights=False) for m in (ref, fast))
    batch = _batch(family)
    losses, grads = [], []
    for model in (ref, fast):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=f"{family}: {name}")
    assert any(".visual." in n or "vision" in n for n in grads[0]), "vision LoRA weights got no gradient"


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_unpatch_restores_hugging_face_forwards(family):
    model = tiny_vlm_model(family)
    batch = _batch(family)
    implementations = {id(c): c._attn_implementation for c in _configs(model)}
    with torch.no_grad():
        before = model(**batch).logits
    record = patch_vision_model(model)
    patched = [m for m, _ in record.patched]
    unpatch_model(model)
    assert all("forward" not in m.__dict__ for m in patched)
    assert {id(c): c._attn_implementation for c in _configs(model)} == implementations
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)


def _configs(model):
    return [model.config] + [getattr(model.config, key) for key in model.config.sub_configs]


# ------------------------------------------------------------------------------------- train, save, reload


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def trained(request, tmp_path_factory):
    """A family's tiny checkpoint loaded through FastVisionModel, LoRA on vision and language, 20 steps."""
    family = request.param
    base_dir = save_tiny_vlm(family, tmp_path_factory.mktemp(f"{family}-base"))
    if family in NO_PROCESSOR_HERE:
        # No processor can be saved here, so FastVisionModel.from_pretrained cannot load this checkpoint:
        # the same steps run on the model built directly.
        model = tiny_vlm_model(family)
        patch_vision_model(model)
        model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
        processor = None
    else:
        model, processor = FastVisionModel.from_pretrained(str(base_dir), max_seq_length=256)
        model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)  # "unsloth" checkpointing (offload)
    batch = _batch(family)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    curve = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    return family, model, processor, batch, curve, tmp_path_factory.mktemp(f"{family}-out")


def test_twenty_steps_reduce_the_loss(trained):
    family, _, _, _, curve, _ = trained
    assert all(torch.isfinite(torch.tensor(curve))), curve
    # A random-init model starts near ln(vocab); LoRA alone (frozen output layer) lowers it steadily.
    assert curve[-1] < 0.9 * curve[0], f"{family}: loss {curve[0]:.3f} -> {curve[-1]:.3f}"
    assert sum(curve[-5:]) < sum(curve[:5]), curve


def _logits(model, batch):
    FastVisionModel.for_inference(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def test_adapter_and_merged_checkpoints_reload_with_the_same_logits(trained):
    family, model, processor, batch, _, out = trained
    expected = _logits(model, batch)
    merged = model.save_pretrained_merged(out / "merged", processor, save_method="merged_16bit", dtype="float32")
    plain = AutoModelForImageTextToText.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        got = plain(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4, msg=f"{family}: merged 16-bit reload")
    if processor is None:
        return  # no processor to reload through FastVisionModel here
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    reloaded, reloaded_processor = FastVisionModel.from_pretrained(str(adapter_dir), max_seq_length=256)
    assert type(reloaded_processor).__name__ == type(processor).__name__
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5,
                               msg=f"{family}: adapter reload")
    FastVisionModel.for_training(model)


def test_text_only_checkpoint_is_refused(tmp_path):
    from tests.factories import save_tiny

    path = save_tiny("llama", tmp_path / "llama")
    with pytest.raises(ConfigError, match="FastLanguageModel"):
        FastVisionModel.from_pretrained(str(path))


@pytest.mark.gpu
@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)
def test_4bit_load_keeps_projector_in_16bit(family, tmp_path):
    path = save_tiny_vlm(family, tmp_path / family)
    model, _ = FastVisionModel.from_pretrained(str(path), load_in_4bit=True, dtype=torch.bfloat16)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    layers = classify_linear_layers(model, vision_spec_for_model(model))
    assert all(kinds[layer.name] != "Linear4bit" for layer in layers if layer.part == "projector"), kinds
    assert any(kinds[layer.name] == "Linear4bit" for layer in layers if layer.part == "language"), kinds


def test_generic_spec_reads_parts_from_the_structure():
    from pronghorn.models.vision.families import _generic_spec

    model = tiny_vlm_model("llava")
    spec = _generic_spec(model)
    assert spec.vision == ("vision_tower",) and spec.projector == ("multi_modal_projector",)
    assert spec.language == "language_model" and spec.text_family.name == "llama"
    assert not spec.fused_loss and not spec.fast_attention  # only what is verified per family
    summary = patch_vision_model(model, spec).summary()
    assert "lm_head_loss" not in summary and "attention" not in summary and summary["mlp"] == 2, summary
    peft_model = _lora(model, finetune_language_layers=False)
    assert all("language_model" not in name for name in _lora_names(peft_model))


def test_image_only_processor_refuses_videos_with_the_fix():
    from pronghorn.models.vision.processors import VideoUnsupportedError

    processor = tiny_processor("qwen2_vl")
    with pytest.raises(VideoUnsupportedError, match="pip install torchvision"):
        processor._process_videos([[sample_image()]])


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_patched_model_generates_what_hugging_face_generates(family):
    """for_inference + generate on an image batch: the patched model (routed vision attention included) picks
    the same greedy tokens as the unpatched one."""
    ref = tiny_vlm_model(family)
    fast = copy.deepcopy(ref)
    patch_vision_model(fast)
    FastVisionModel.for_inference(fast)
    ref.eval()
    batch = {k: v for k, v in _batch(family).items() if k != "labels"}
    outs = [m.generate(**batch, max_new_tokens=4, do_sample=False) for m in (ref, fast)]
    assert torch.equal(outs[0], outs[1]), f"{family}: {outs}"
