"""Hub uploads (through a recording stand-in), model cards, Ollama Modelfiles and bound model methods."""
import pytest

from pronghorn.export import attach_export_methods, detach_export_methods
from pronghorn.export.hub import (
    push_to_hub_adapter,
    push_to_hub_gguf,
    push_to_hub_merged,
)
from pronghorn.export.ollama import modelfile_text, ollama_pieces_for
from tests.export.helpers import lora_model, tokenizer_for


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False):
        self.repos.append({"repo_id": repo_id, "token": token, "private": private, "exist_ok": exist_ok})

    def upload_folder(self, *, repo_id, folder_path, token=None, commit_message=None, repo_type=None):
        from pathlib import Path

        files = {p.name: (p.read_text() if p.name == "README.md" else p.stat().st_size)
                 for p in Path(folder_path).iterdir()}
        self.uploads.append({"repo_id": repo_id, "files": files, "token": token, "message": commit_message})
        return "https://hub.example/" + repo_id


def test_push_merged_records_files_private_flag_and_card():
    hub = RecordingHub()
    model = lora_model("llama")
    url = push_to_hub_merged(model, "me/tiny-merged", tokenizer_for(model), token="hf_x", private=True, api=hub,
                             training_settings={"learning_rate": 2e-4, "dataset": "corpus"})
    assert url.endswith("me/tiny-merged")
    assert hub.repos == [{"repo_id": "me/tiny-merged", "token": "hf_x", "private": True, "exist_ok": True}]
    files = hub.uploads[0]["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    card = files["README.md"]
    assert "merged_16bit" in card and "| r | `4` |" in card and "| learning_rate | `0.0002` |" in card
    assert "| dataset | `corpus` |" in card


def test_push_adapter_and_gguf():
    hub = RecordingHub()
    model = lora_model("qwen2")
    push_to_hub_adapter(model, "me/adapter", tokenizer_for(model), private=False, api=hub)
    assert "adapter_model.safetensors" in hub.uploads[0]["files"] and hub.repos[0]["private"] is False
    push_to_hub_gguf(model, "me/gguf", tokenizer_for(model), "q8_0", api=hub, ollama=False)
    assert "model.Q8_0.gguf" in hub.uploads[1]["files"] and "gguf" in hub.uploads[1]["files"]["README.md"]


def test_bad_repo_id():
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub_merged(lora_model("llama"), "a/b/c", api=RecordingHub())


def test_modelfile_from_passed_pieces():
    text = modelfile_text("model.Q8_0.gguf", "{{ .Prompt }}", ["<|im_end|>", "<|im_start|>"],
                          {"temperature": 0.7, "top_k": 20})
    assert text.splitlines() == ['FROM ./model.Q8_0.gguf', '', 'TEMPLATE """{{ .Prompt }}"""', '',
                                 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"',
                                 'PARAMETER temperature 0.7', 'PARAMETER top_k 20']


def test_modelfile_follows_registered_training_template(tmp_path):
    from pronghorn.data.chat_templates import get_chat_template
    from pronghorn.data.templates.registry import ollama_template
    from pronghorn.export.gguf.save import save_pretrained_gguf

    model = lora_model("qwen2")
    tok = get_chat_template(tokenizer_for(model), "chatml")
    template, stops, params = ollama_pieces_for(tok)
    assert (template, stops, params) == ollama_template("chatml")
    save_pretrained_gguf(model, tmp_path / "g", tok, "q8_0")
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.Q8_0.gguf\n")
    assert f'TEMPLATE """{template}"""' in modelfile
    assert all(f'PARAMETER stop "{s}"' in modelfile for s in stops)


def test_unregistered_template_is_a_clear_error():
    model = lora_model("llama")
    tok = tokenizer_for(model)
    tok.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="registered templates"):
        ollama_pieces_for(tok)


def test_attach_export_methods(tmp_path):
    model = lora_model("llama")
    names = attach_export_methods(model)
    assert set(names) == {"save_pretrained_merged", "push_to_hub_merged", "save_pretrained_gguf", "push_to_hub_gguf"}
    out = model.save_pretrained_merged(tmp_path / "m", tokenizer_for(model))
    assert (out / "model.safetensors").exists()
    detach_export_methods(model, names)
    assert "save_pretrained_merged" not in model.__dict__
