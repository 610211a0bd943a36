"""Utilisation sampling, the lab report's GPU screenshots as data: a background thread records
GPU utilisation and memory (NVML), process CPU and RSS (psutil) and throughput about once a
second. It never stops a run: what it cannot read, it records as a note and skips."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil
import torch


class _Gpu:
    """NVML readings for one CUDA device, or a note saying why there are none."""

    def __init__(self, device: torch.device) -> None:
        self.handle, self.note = None, None
        if device.type != "cuda":
            self.note = "no GPU in use: GPU utilisation not recorded"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            if uuid is not None:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode())
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.nvml = pynvml
        except Exception as e:  # no library, no driver, no permission: all the same here
            self.note = f"NVML unavailable ({type(e).__name__}: {e}): GPU utilisation not recorded"

    def read(self) -> tuple[float | None, float | None]:
        if self.handle is None:
            return None, None
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
            return float(util), round(mem, 1)
        except Exception as e:
            self.handle, self.note = None, f"NVML stopped answering ({e})"
            return None, None


class Sampler:
    """Calls `record(dict)` with a `telemetry` record every `interval` seconds until stopped.

    `images_done()` returns the number of images trained so far (read without syncing the
    device), from which throughput is derived."""

    def __init__(self, record: Callable[[dict], None], device: torch.device, interval: float,
                 images_done: Callable[[], int]) -> None:
        self.record, self.interval, self.images_done = record, interval, images_done
        self.device = device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cnnlab-telemetry", daemon=True)

    def __enter__(self) -> Sampler:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            process = psutil.Process()
            process.cpu_percent(None)  # the first reading only starts the clock
            gpu = _Gpu(self.device)
            reported: set[str] = set()
            start = last_time = time.perf_counter()
            last_images = self.images_done()
            while not self._stop.wait(self.interval):
                now, images = time.perf_counter(), self.images_done()
                util, mem = gpu.read()
                record = {"type": "telemetry", "time": round(time.time(), 3),
                          "elapsed": round(now - start, 3),
                          "cpu_percent": process.cpu_percent(None),
                          "rss_mb": round(process.memory_info().rss / 2**20, 1),
                          "gpu_util": util, "gpu_mem_mb": mem,
                          "images_per_second": round((images - last_images) / (now - last_time),
                                                     1)}
                if gpu.note and gpu.note not in reported:  # say once what is not recorded
                    record["notes"] = [gpu.note]
                    reported.add(gpu.note)
                self.record(record)
                last_time, last_images = now, images
        except Exception:  # the sampler must never take a run down
            return
