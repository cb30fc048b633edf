"""Streaming safetensors shard writer in the layout transformers reads.

Tensors are appended one at a time; a shard is flushed to disk once adding the next tensor would
pass ``max_shard_bytes``. Only the current shard is held in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


class ShardWriter:
    """Collect tensors into ``<prefix>-0000i-of-0000n.safetensors`` shards plus an index."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int, prefix: str = "model"):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (CPU, contiguous) under ``name``; may flush the current shard first."""
        if name in self._current or any(name in keys for _, keys in self._shards):
            raise ValueError(f"tensor {name!r} was written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._current[name] = tensor
        self._current_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".{self.prefix}-shard-{len(self._shards):05d}.safetensors"
        save_file(self._current, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._current)))
        self._current = {}
        self._current_bytes = 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index; returns the files."""
        if self._current or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.directory / f"{self.prefix}.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, keys) in enumerate(self._shards):
            final = self.directory / f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        index_path = self.directory / f"{self.prefix}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files + [index_path]
