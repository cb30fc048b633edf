"""Memory policies: gradient checkpointing (on GPU or offloaded to host memory) and tiled MLPs."""
from pronghorn.memory.checkpointing import (
    CheckpointingChange,
    checkpointing_mode,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    normalize_checkpointing_mode,
)
from pronghorn.memory.offload import offloaded_checkpoint
from pronghorn.memory.tiled_mlp import TiledMLPPatch, enable_tiled_mlp, tiled_mlp_forward

__all__ = [
    "CheckpointingChange",
    "checkpointing_mode",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "normalize_checkpointing_mode",
    "offloaded_checkpoint",
    "TiledMLPPatch",
    "enable_tiled_mlp",
    "tiled_mlp_forward",
]
