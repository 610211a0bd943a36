"""The machine a run ran on: the record the lab report kept as a container screenshot."""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata

import psutil
import torch

from .limits import usable_cpus


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env(device: torch.device | None = None) -> dict:
    cpu = cpu_model()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),  # importing it would cost 1-3 s
        "cuda": torch.version.cuda,
        # of a GPU run only: on a CPU, loading cuDNN (a GiB of address space) may fail
        "cudnn": torch.backends.cudnn.version() if device is not None and
        device.type == "cuda" and torch.backends.cudnn.is_available() else None,
        "device": str(device) if device is not None else None,
        "device_name": cpu,
        "cpu_model": cpu,
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpus_usable": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env["gpus"].append({"index": i, "name": props.name,
                                "memory_gb": round(props.total_memory / 2**30, 1),
                                "capability": f"{props.major}.{props.minor}"})
        if device is not None and device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _version(package: str) -> str | None:
    """An installed package's version, without importing it."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
