"""Export: merged checkpoints, GGUF files, Ollama Modelfiles and Hub uploads."""
from pronghorn.export.atomic import ExportError
from pronghorn.export.gguf.save import save_pretrained_gguf
from pronghorn.export.hub import (
           push_to_hub_adapter,
           push_to_hub_gguf,
           push_to_hub_merged,
)
from pronghorn.export.methods import attach_export_methods, detach_export_methods
from pronghorn.export.ollama import modelfile_text, write_modelfile
from pronghorn.export.save import save_pretrained_merged

__all__ = [
           "ExportError",
           "attach_export_methods",
           "detach_export_methods",
           "modelfile_text",
           "push_to_hub_adapter",
           "push_to_hub_gguf",
           "push_to_hub_merged",
           "save_pretrained_gguf",
           "save_pretrained_merged",
           "write_modelfile",
]
