"""``pronghorn doctor``: the environment as pronghorn sees it."""
from __future__ import annotations

import platform
import sys

from pronghorn.versions import TESTED, installed_version


def environment_report() -> dict[str, str]:
    import torch

    from pronghorn.kernels.backend import triton_importable
    from pronghorn.quant.bnb import bitsandbytes_problem

    report = {
        "pronghorn": installed_version("pronghorn") or "source checkout",
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        report["bf16"] = str(torch.cuda.is_bf16_supported())
    for package in ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "triton", "gguf",
                    "flash_attn", "llama_cpp_python"):
        version = installed_version(package.replace("_", "-")) or "not installed"
        window = TESTED.get(package)
        report[package] = f"{version}" + (f"  (tested: >={window[0]},<{window[1]})" if window else "")
    report["triton kernels"] = "available" if triton_importable() and torch.cuda.is_available() else (
        "PyTorch fallback (no CUDA GPU or no triton)")
    report["4-bit/8-bit"] = bitsandbytes_problem() or "available"
    return report


def doctor_command() -> int:
    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0
