"""Tiled MLP: run a decoder layer's MLP over token tiles so ``[tokens, intermediate]`` never exists whole.

At long context the MLP dominates activation memory: a gated MLP keeps gate, up and the activated
product, each ``tokens x intermediate`` (3.5x hidden for Llama-3-8B), for its backward. The MLP acts
on every token independently, so it can be computed a tile of tokens at a time. Inside a custom
autograd Function, forward runs the tiles without keeping anything but the input; backward
recomputes each tile with grad enabled, back-propagates that tile's slice of the output gradient
(parameter gradients accumulate into ``.grad``), and writes that tile's input gradient. Peak MLP
memory becomes one tile's worth; the gradients are exact (only the order in which tiles add into a
parameter's gradient differs from the untiled sum).

Random masks (LoRA dropout) are replayed: backward restores the RNG state forward started from and
recomputes the tiles in the same order. Like reentrant checkpointing, parameter gradients reach
``.grad`` through an inner ``backward``, so the outer pass must be ``loss.backward()``.
"""
from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["TiledMLPPatch", "enable_tiled_mlp", "is_tiled", "tiled_mlp_forward"]

_TILED: weakref.WeakSet = weakref.WeakSet()  # the MLP modules whose forward runs in tiles now


def is_tiled(module: torch.nn.Module) -> bool:
    """Whether :func:`enable_tiled_mlp` rebound ``module``'s forward (and has not reverted it)."""
    return module in _TILED


class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp_forward, tile_tokens, anchor, x):
        del anchor  # makes the output require grad when only the MLP's parameters do
        ctx.mlp_forward, ctx.tile_tokens = mlp_forward, tile_tokens
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        dev = x.device.type
        ctx.autocast = dict(device_type=dev, enabled=torch.is_autocast_enabled(dev),
                            dtype=torch.get_autocast_dtype(dev), cache_enabled=torch.is_autocast_cache_enabled())
        ctx.x_needs_grad = x.requires_grad
        ctx.save_for_backward(x)
        rows = x.reshape(-1, x.shape[-1])
        outs = [mlp_forward(tile) for tile in rows.split(tile_tokens)]
        if not isinstance(outs[0], torch.Tensor):
            raise TypeError(f"tiled MLP needs an MLP that returns a tensor, got {type(outs[0]).__name__}")
        return torch.cat(outs).view(*x.shape[:-1], outs[0].shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.x_needs_grad else None
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            start = 0
            for tile, g in zip(rows.split(ctx.tile_tokens), grad_rows.split(ctx.tile_tokens)):
                tile = tile.detach().requires_grad_(ctx.x_needs_grad)
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    out = ctx.mlp_forward(tile)
                if out.requires_grad:
                    torch.autograd.backward(out, g)
                if grad_x is not None:
                    grad_x[start : start + tile.shape[0]] = tile.grad
                start += tile.shape[0]
        return None, None, None, (grad_x.view_as(x) if grad_x is not None else None)


def tiled_mlp_forward(mlp_forward, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """``mlp_forward(x)`` computed ``tile_tokens`` tokens at a time (over all leading dims of ``x``)."""
    tokens = x.numel() // x.shape[-1]
    if tokens <= tile_tokens or not torch.is_grad_enabled():
        if tokens <= tile_tokens:
            return mlp_forward(x)
        # Inference: tiling still bounds memory, nothing to recompute.
        rows = x.reshape(-1, x.shape[-1])
        out = torch.cat([mlp_forward(t) for t in rows.split(tile_tokens)])
        return out.view(*x.shape[:-1], out.shape[-1])
    anchor = torch.empty(0, requires_grad=True)
    return _TiledMLPFunction.apply(mlp_forward, tile_tokens, anchor, x)


@dataclass
class TiledMLPPatch:
    """The MLPs whose ``forward`` was rebound by :func:`enable_tiled_mlp`; ``revert()`` undoes it."""

    tile_tokens: int
    modules: list[str] = field(default_factory=list)
    _originals: list = field(default_factory=list, repr=False)

    def revert(self) -> None:
        for module, had_instance_forward, original in self._originals:
            _TILED.discard(module)
            if had_instance_forward:
                module.forward = original
            else:
                del module.forward
        self._originals.clear()


def _default_tile_tokens(config) -> int:
    # Bound one tile's intermediate activations to about what the hidden states of 8K tokens take.
    hidden = getattr(config, "hidden_size", 4096)
    intermediate = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    return max(1024, 8192 * hidden // max(intermediate, 1) // 1024 * 1024)


def enable_tiled_mlp(model: torch.nn.Module, tile_tokens: int | None = None) -> TiledMLPPatch:
    """Rebind each decoder layer's ``mlp.forward`` on ``model`` (PEFT-wrapped or not) to run in token tiles.

    Args:
        model: a transformers causal LM; its decoder layers' ``mlp`` submodules are patched.
        tile_tokens: tokens per tile; default from the config (about ``8192 * hidden / intermediate``,
            at least 1024). Inputs no longer than one tile run untiled.

    Returns:
        A :class:`TiledMLPPatch`; call ``.revert()`` to restore the original forwards.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    tile = int(tile_tokens) if tile_tokens is not None else _default_tile_tokens(config)
    if tile < 1:
        raise ValueError(f"tile_tokens must be positive, got {tile_tokens}")
    patch = TiledMLPPatch(tile_tokens=tile)
    for name, layer in base.named_modules():
        mlp = getattr(layer, "mlp", None) if isinstance(layer, GradientCheckpointingLayer) else None
        if mlp is None:
            continue
        had_instance_forward = "forward" in vars(mlp)
        original = mlp.forward

        def forward(self, x, _original=original, _tile=tile):
            return tiled_mlp_forward(_original, x, _tile)

        mlp.forward = types.MethodType(forward, mlp)
        _TILED.add(mlp)
        patch.modules.append(f"{name}.mlp")
        patch._originals.append((mlp, had_instance_forward, original))
    if not patch.modules:
        raise ValueError(f"{type(base).__name__} has no decoder layers with an `mlp` submodule to tile")
    return patch

