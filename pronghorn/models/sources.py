"""Resolving what the user named: the embedded default, a local checkpoint, a LoRA adapter, or a hub name."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


class ModelNotFoundError(OSError):
    pass


@dataclass(frozen=True)
class ModelSource:
    base: str  # what to load the base model from
    adapter: str | None = None  # a LoRA adapter directory to load on top, if the user named one


def resolve_source(model_name: str | os.PathLike | None, token=None, revision=None,
                   trust_remote_code=False) -> ModelSource:
    """Map ``model_name`` to a loadable base (+ adapter); raise ModelNotFoundError naming what was tried."""
    if model_name is None:
        return ModelSource(str(DEFAULT_MODEL_DIR))
    name = os.fspath(model_name)
    path = Path(name).expanduser()
    if path.is_dir():
        adapter_cfg = path / "adapter_config.json"
        if adapter_cfg.is_file():
            base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelNotFoundError(f"{path} is a LoRA adapter but its adapter_config.json names no "
                                         "base_model_name_or_path; add it, or load the base model and then "
                                         "PeftModel.from_pretrained(model, adapter_dir)")
            return ModelSource(resolve_source(base, token, revision, trust_remote_code).base, str(path))
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json (a Hugging Face "
                                     "checkpoint) nor adapter_config.json (a LoRA adapter)")
        return ModelSource(str(path))
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the checkpoint's directory instead")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ModelNotFoundError(f"Model path {name!r} does not exist on this machine")
    return _resolve_hub(name, token, revision)


def _resolve_hub(name: str, token, revision) -> ModelSource:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        hf_hub_download(name, "config.json", token=token, revision=revision)
        return ModelSource(name)
    except RemoteEntryNotFoundError:
        pass  # the repository exists but has no config.json: it may be an adapter
    except Exception as error:  # noqa: BLE001 - many hub/network error types; re-raised with context
        raise ModelNotFoundError(
            f"Could not find model {name!r}: it is not a local directory, and the Hugging Face Hub lookup "
            f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check the "
            "spelling (e.g. 'meta-llama/Llama-3.1-8B'), your network and token, or pass a local path."
        ) from error
    try:
        adapter_file = hf_hub_download(name, "adapter_config.json", token=token, revision=revision)
    except Exception as error:  # noqa: BLE001
        raise ModelNotFoundError(f"{name!r} on the Hub has neither config.json nor adapter_config.json") from error
    base = json.loads(Path(adapter_file).read_text()).get("base_model_name_or_path")
    return ModelSource(_resolve_hub(base, token, revision).base, name)
