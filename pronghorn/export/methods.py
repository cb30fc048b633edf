"""Bind the export functions onto a model instance (Unsloth-style ``model.save_pretrained_merged(...)``)."""
from __future__ import annotations

import types

from torch import nn

from pronghorn.export.gguf.save import save_pretrained_gguf
from pronghorn.export.hub import push_to_hub_gguf, push_to_hub_merged
from pronghorn.export.save import save_pretrained_merged

EXPORT_METHODS = {
    "save_pretrained_merged": save_pretrained_merged,
    "push_to_hub_merged": push_to_hub_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub_gguf": push_to_hub_gguf,
}


def attach_export_methods(model: nn.Module) -> list[str]:
    """Add ``save_pretrained_merged``, ``push_to_hub_merged``, ``save_pretrained_gguf`` and ``push_to_hub_gguf``
    as bound methods of this ``model`` instance (its class is untouched). Returns the names added;
    :func:`detach_export_methods` removes them.
    """
    added = []
    for name, fn in EXPORT_METHODS.items():
        bound = types.MethodType(fn, model)
        object.__setattr__(model, name, bound)
        added.append(name)
    return added


def detach_export_methods(model: nn.Module, names: list[str] | None = None) -> None:
    """Remove methods added by :func:`attach_export_methods` from ``model``."""
    for name in names or list(EXPORT_METHODS):
        if name in model.__dict__:
            object.__delattr__(model, name)
