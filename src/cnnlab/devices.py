"""Where a run computes and in which precision: `auto` resolved to the device and the
precision that ran."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import CnnlabError
from .models import REGISTRY

if TYPE_CHECKING:  # torch is imported where a device is resolved: --help stays light
    import torch


def default_device(value: str | None = None) -> str:
    """The device to use: `value`, else $CNNLAB_DEVICE, else auto."""
    return value or os.environ.get("CNNLAB_DEVICE") or "auto"


def resolve_device(spec: str | None = None) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`; None: the default
    device ($CNNLAB_DEVICE, else auto)."""
    import torch

    spec = default_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise CnnlabError(f"bad device '{spec}'; use auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise CnnlabError(f"--device {spec}: no CUDA GPU is available here; "
                              "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CnnlabError(f"--device {spec}: this machine has {count} GPU(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return device
    raise CnnlabError(f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated, and slower than fp32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch >= 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device, model: str = "") -> str:
    """`auto`: bf16 on GPUs that have it, else fp16 on GPUs; on CPUs bf16 for the models it
    speeds up where the CPU has native bf16, else fp32."""
    import torch

    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise CnnlabError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    speeds = model in REGISTRY and REGISTRY[model].cpu_bf16
    return "bf16" if speeds and cpu_has_bf16() else "fp32"
