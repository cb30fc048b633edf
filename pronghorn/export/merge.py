"""Layer-by-layer LoRA merging without touching the user's model.

The model is walked module by module. Every weight is described by a :class:`TensorSource` whose
``load()`` produces the final tensor on demand: for a LoRA layer it dequantizes the base weight
(bitsandbytes 4-bit or 8-bit) if needed and adds ``scaling * B @ A`` in fp32. Exporters call
``load()`` one tensor at a time, cast, write, and drop the result, so peak extra memory is one
layer's weights (plus whatever the writer buffers, e.g. one safetensors shard), never a second
copy of the model. The PEFT model itself is only read: ``merge_and_unload`` is never called.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn


@dataclasses.dataclass
class TensorSource:
    """One output tensor: its state-dict ``name``, ``shape``, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    is_linear_weight: bool = False   # a Linear layer's weight (eligible for 4-bit export)
    merged: bool = False             # a LoRA delta is added on load

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclasses.dataclass
class MergePlan:
    """All tensors of the merged model, plus facts the writers need."""

    sources: list[TensorSource]
    config: object               # the base transformers config (not modified)
    dtype: torch.dtype           # dtype the merged model is written in
    untie_embeddings: bool       # LoRA touched one side of a tied pair: both must be written
    adapters: list[str]          # adapters merged in
    base_model: nn.Module


def unwrap_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # PEFT is a dependency; without it there can be no LoRA layers
        return False
    return isinstance(module, LoraLayer)


def _is_modules_to_save(module: nn.Module) -> bool:
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """Logical (unquantized) shape of ``module.weight``."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        return tuple(quant_state.shape)
    return tuple(weight.shape)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a float tensor, dequantizing bitsandbytes 4-bit / 8-bit storage."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(weight)
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    if type(weight).__name__ == "Int8Params":
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=getattr(module, "state", None))
    return weight.detach()


def _dequantize_cpu_packed(weight) -> torch.Tensor:
    """Dequantize a 4-bit weight that bitsandbytes repacked in place for its CPU kernel.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode rewrites ``weight.data`` into a
    kernel layout (and the QuantState with it) the first time it runs, so ``dequantize_4bit`` on the
    raw data would read garbage. We undo the packing on copies -- the user's module is left as is --
    and use the float per-block scales the packed forward itself uses.
    """
    import copy

    import bitsandbytes.functional as bnbf

    packed_state = weight.quant_state
    state = copy.copy(packed_state)
    state.original_nested = False   # keep the float scales; do not re-quantize them
    codes, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data.clone(), state)
    state.absmax = packed_state.absmax.T.reshape(-1).float()
    state.nested = False
    return bnbf.dequantize_4bit(codes, state)


def _active_adapters(layer: nn.Module) -> list[str]:
    if getattr(layer, "disable_adapters", False):
        return []
    names = layer.active_adapters
    return [names] if isinstance(names, str) else list(names)


def lora_delta(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scaling * B @ A, scaling * B.bias)`` of one adapter, in fp32, shaped like the base weight."""
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise NotImplementedError(
            f"adapter {adapter!r} uses DoRA; merged export supports plain LoRA only. "
            "Save the adapter with save_method='lora' instead")
    scaling = float(layer.scaling[adapter])
    if adapter in getattr(layer, "lora_A", {}):
        a = layer.lora_A[adapter].weight.detach().float()
        b = layer.lora_B[adapter].weight.detach().float()
        bias = layer.lora_B[adapter].bias
        bias_delta = bias.detach().float() * scaling if bias is not None else None
        if a.dim() != 2:
            return _conv_delta(layer, a, b, scaling), bias_delta
        delta = (b.to(a.device) @ a) * scaling
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        return delta, bias_delta
    if adapter in getattr(layer, "lora_embedding_A", {}):
        a = layer.lora_embedding_A[adapter].detach().float()   # (r, num_embeddings)
        b = layer.lora_embedding_B[adapter].detach().float()   # (embedding_dim, r)
        return (b.to(a.device) @ a).T * scaling, None
    raise NotImplementedError(f"adapter {adapter!r} has no LoRA matrices on {type(layer).__name__}")


def _conv_delta(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA delta of a Conv2d/Conv3d layer (e.g. a vision patch embedding), shaped like its kernel.

    PEFT's conv LoRA is ``B(A(x))`` with A a conv of the base kernel size and B a 1x1 conv, so the
    merged kernel is ``B @ A`` over the flattened (in, *kernel) axis.
    """
    base = layer.get_base_layer()
    if any(k != 1 for k in b.shape[2:]) or getattr(base, "groups", 1) != 1:
        raise NotImplementedError(f"LoRA on {type(base).__name__} with a {tuple(b.shape[2:])} lora_B kernel or "
                                  f"groups={getattr(base, 'groups', 1)} cannot be merged for export; only the "
                                  "standard PEFT conv LoRA (1x1 lora_B, groups=1) is supported")
    delta = b.flatten(1).to(a.device) @ a.flatten(1)
    return delta.reshape(weight_shape(base)) * scaling


def _merged_loader(layer: nn.Module, adapters: list[str], which: str) -> Callable[[], torch.Tensor]:
    base = layer.get_base_layer()

    def load() -> torch.Tensor:
        if which == "weight":
            out = dequantized_weight(base).float()
        else:
            out = base.bias.detach().float()
        for adapter in adapters:
            delta, bias_delta = lora_delta(layer, adapter)
            if which == "weight":
                out = out + delta.to(out.device)
            elif bias_delta is not None:
                out = out + bias_delta.to(out.device)
        return out

    return load


def _plain_loader(module: nn.Module, pname: str) -> Callable[[], torch.Tensor]:
    if pname == "weight":
        return lambda: dequantized_weight(module)
    return lambda: getattr(module, pname).detach()


def _leaf_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=False)
    for bname, b in module.named_buffers(recurse=False):
        if b is not None and bname not in getattr(module, "_non_persistent_buffers_set", set()):
            yield bname, b


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def default_export_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a merged model is written in: the embeddings' dtype (stays unquantized under bnb)."""
    dtype = base.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.float16


def plan_merge(model: nn.Module, dtype: torch.dtype | None = None) -> MergePlan:
    """Describe every tensor of ``model`` with its LoRA adapters merged, without computing any."""
    base = unwrap_base_model(model)
    sources: list[TensorSource] = []
    owners: dict[int, list[str]] = {}         # parameter identity -> module names holding it (ties)
    lora_weight_ids: set[int] = set()
    merged_adapters: set[str] = set()
    skip_prefixes: list[str] = []
    entries = []
    for mod_name, module in base.named_modules():
        if any(mod_name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if _is_lora_layer(module):
            skip_prefixes.append(prefix)
            inner = module.get_base_layer()
            adapters = [] if module.merged else [a for a in _active_adapters(module)
                                                 if a in module.lora_A or a in module.lora_embedding_A]
            merged_adapters.update(adapters)
            owners.setdefault(id(inner.weight), []).append(prefix + "weight")
            if adapters:
                lora_weight_ids.add(id(inner.weight))
            entries.append((id(inner.weight), TensorSource(
                prefix + "weight", weight_shape(inner),
                _merged_loader(module, adapters, "weight") if adapters else _plain_loader(inner, "weight"),
                is_linear_weight=_is_linear(inner), merged=bool(adapters))))
            if getattr(inner, "bias", None) is not None:
                entries.append((id(inner.bias), TensorSource(
                    prefix + "bias", tuple(inner.bias.shape),
                    _merged_loader(module, adapters, "bias") if adapters else _plain_loader(inner, "bias"))))
            continue
        if _is_modules_to_save(module):
            skip_prefixes.append(prefix)
            active = [a for a in _active_adapters(module) if a in module.modules_to_save]
            chosen = module.modules_to_save[active[0]] if active else module.original_module
            for sub_name, sub in chosen.named_modules():
                sub_prefix = prefix + (f"{sub_name}." if sub_name else "")
                for pname, p in _leaf_tensors(sub):
                    entries.append((id(p), TensorSource(sub_prefix + pname, tuple(p.shape),
                                                        _plain_loader(sub, pname))))
            continue
        for pname, p in _leaf_tensors(module):
            shape = weight_shape(module) if pname == "weight" else tuple(p.shape)
            owners.setdefault(id(p), []).append(prefix + pname)
            entries.append((id(p), TensorSource(prefix + pname, shape, _plain_loader(module, pname),
                                                is_linear_weight=pname == "weight" and _is_linear(module))))
    untie = any(len(owners.get(pid, [])) > 1 for pid in lora_weight_ids)
    seen: set[int] = set()
    for pid, src in entries:
        if pid in seen and not untie:
            continue   # a tied parameter is written once, as transformers does
        seen.add(pid)
        sources.append(src)
    return MergePlan(sources=sources, config=base.config, dtype=dtype or default_export_dtype(base),
                     untie_embeddings=untie, adapters=sorted(merged_adapters), base_model=base)


def materialize(source: TensorSource, dtype: torch.dtype | None) -> torch.Tensor:
    """``source`` computed, cast to ``dtype`` (floating tensors only), contiguous, on the CPU."""
    t = source.load()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous()
