"""Pushing exports to the Hugging Face Hub through a small seam.

Every push builds the export in a local temporary folder with the same code as the ``save_*``
functions, then hands the folder to a hub client that has ``create_repo`` and ``upload_folder``
(``huggingface_hub.HfApi`` by default). Tests pass a stand-in client that records the upload.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

from torch import nn


class HubClient(Protocol):
    """The two ``huggingface_hub.HfApi`` calls an upload needs."""

    def create_repo(self, repo_id: str, *, token=None, private=None, repo_type=None, exist_ok=False): ...

    def upload_folder(self, *, repo_id: str, folder_path, token=None, commit_message=None, repo_type=None): ...


def default_hub_client() -> HubClient:
    """``huggingface_hub.HfApi()``."""
    from huggingface_hub import HfApi

    return HfApi()


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload with pronghorn", api: HubClient | None = None):
    """Create ``repo_id`` if needed (``private`` applies on creation) and upload every file of ``folder``."""
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"repo_id {repo_id!r} must be 'name' or 'user_or_org/name'")
    api = api or default_hub_client()
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, commit_message=commit_message,
                             repo_type="model")


def _staging_dir(temporary_location: str | os.PathLike | None) -> tempfile.TemporaryDirectory:
    if temporary_location is not None:
        Path(temporary_location).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="pronghorn-push-", dir=temporary_location)


def push_to_hub_merged(model: nn.Module, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", *,
                       token: str | None = None, private: bool | None = None, commit_message: str | None = None,
                       temporary_location: str | os.PathLike | None = None, api: HubClient | None = None,
                       **save_kwargs):
    """Export like :func:`save_pretrained_merged` (``"merged_16bit"``, ``"merged_4bit"`` or ``"lora"``) and upload.

    Args:
        repo_id: ``"user/name"`` on the Hub.
        token: Hub token (default: the logged-in one).
        private: create the repository private (applies when it is created).
        temporary_location: where the export is staged before upload (needs the export's disk space).
        api: hub client (``huggingface_hub.HfApi`` by default).
        save_kwargs: passed to :func:`save_pretrained_merged` (``max_shard_size``, ``dtype``, ``training_settings``).
    """
    from pronghorn.export.save import save_pretrained_merged

    with _staging_dir(temporary_location) as staging:
        folder = save_pretrained_merged(model, Path(staging) / "export", tokenizer, save_method, **save_kwargs)
        return push_folder(folder, repo_id, token=token, private=private, api=api,
                           commit_message=commit_message or f"Upload {save_method} model with pronghorn")


def push_to_hub_adapter(model: nn.Module, repo_id: str, tokenizer=None, **kwargs):
    """Upload only the LoRA adapter (same as ``push_to_hub_merged(..., save_method="lora")``)."""
    return push_to_hub_merged(model, repo_id, tokenizer, "lora", **kwargs)


def push_to_hub_gguf(model: nn.Module, repo_id: str, tokenizer, quantization_method: str | list[str] = "q8_0", *,
                     token: str | None = None, private: bool | None = None, commit_message: str | None = None,
                     temporary_location: str | os.PathLike | None = None, api: HubClient | None = None,
                     **gguf_kwargs):
    """Export like :func:`save_pretrained_gguf` (GGUF files, Modelfile, model card) and upload."""
    from pronghorn.export.gguf.save import save_pretrained_gguf

    with _staging_dir(temporary_location) as staging:
        folder = Path(staging) / "export"
        save_pretrained_gguf(model, folder, tokenizer, quantization_method, **gguf_kwargs)
        return push_folder(folder, repo_id, token=token, private=private, api=api,
                           commit_message=commit_message or "Upload GGUF model with pronghorn")
