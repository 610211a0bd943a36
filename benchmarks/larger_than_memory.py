"""Training from the disk cache: a synthetic image folder whose decoded size is three times a
memory limit this script sets itself (a memory cgroup of its own), trained for part of an
epoch under that limit - the process tree's peak memory against the limit - and the images/s
of the disk path against the in-memory path on a subset that fits, the page cache warm.

    sudo python benchmarks/larger_than_memory.py [--limit-mib 1536] [--side 160] [--out f.json]

Needs root and a memory controller (cgroup v2's memory.max or v1's memory.limit_in_bytes).
Every figure is measured in this run, one after another: compare them only as ratios."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

CLASSES = 10


def _write_images(job: tuple[Path, int, int, int]) -> None:
    """Images of class k: noise with a bright block at a class-specific place (JPEG)."""
    from PIL import Image

    folder, start, count, side = job
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        k = i % CLASSES
        pixels = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
        r, c = (k // 5) * side // 2 + side // 8, (k % 5) * side // 5
        pixels[r:r + side // 4, c:c + side // 6] = 255
        Image.fromarray(pixels).save(folder / f"class{k}" / f"{i:06d}.jpg", quality=90)


def make_folder(root: Path, train: int, test: int, side: int) -> None:
    jobs = []
    for split, count, offset in (("train", train, 0), ("test", test, 10**7)):
        for k in range(CLASSES):
            (root / split / f"class{k}").mkdir(parents=True, exist_ok=True)
        step = 2000
        jobs += [(root / split, offset + s, min(step, count - s), side)
                 for s in range(0, count, step)]
    with multiprocessing.Pool() as pool:
        pool.map(_write_images, jobs)


def memory_cgroup(limit: int) -> tuple[Path, str]:
    """A new memory cgroup under this process's own, limited to `limit` bytes: (its folder,
    the file its peak usage is read from)."""
    name = f"cnnlab-bench-{os.getpid()}"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and Path("/sys/fs/cgroup/cgroup.controllers").is_file():  # v2
            group = Path("/sys/fs/cgroup") / path.lstrip("/") / name
            group.mkdir()
            (group / "memory.max").write_text(str(limit))
            return group, "memory.peak"
        if "memory" in controllers.split(","):  # v1
            group = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / name
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit))
            return group, "memory.max_usage_in_bytes"
    raise SystemExit("no memory cgroup can be made here (needs root and a memory controller)")


def train(folder: Path, out: Path, epochs: float, in_memory: str, cgroup: Path | None,
          data_dir: Path) -> dict:
    """`cnnlab train lenet5 folder:...` in a process of its own (in `cgroup`, if given):
    its summary, and the peak memory of its process tree, sampled every 0.1 s (anonymous:
    resident less file-backed pages, which the kernel may drop)."""
    command = [sys.executable, "-m", "cnnlab", "train", "lenet5", f"folder:{folder}",
               "--epochs", str(epochs), "--batch-size", "128", "--eval-batch-size", "128",
               "--in-memory", in_memory,
               "--telemetry", "0", "--quiet", "--out", str(out), "--data-dir", str(data_dir)]

    def join() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    start = time.perf_counter()
    process = subprocess.Popen(command, preexec_fn=join, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
            anonymous = sum(p.memory_info().rss - p.memory_info().shared for p in tree)
            peak = max(peak, anonymous)
        except psutil.Error:
            pass
        time.sleep(0.1)
    err = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"training failed ({process.returncode}): {err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"images_per_second": summary["images_per_second"],
            "train_seconds": summary["train_seconds"], "wall_seconds":
            round(time.perf_counter() - start, 1), "peak_anonymous_mib": peak >> 20,
            "final_test_acc": summary["final_test_acc"], "notes": [
                line for line in err.splitlines() if line.startswith("cnnlab: note")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-mib", type=int, default=1536)
    parser.add_argument("--side", type=int, default=160, help="image side in pixels")
    parser.add_argument("--epochs", type=float, default=0.25, help="of the large folder")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    limit = args.limit_mib << 20
    image = 3 * args.side * args.side
    train_count = math.ceil(3 * limit / image)
    work = Path(tempfile.mkdtemp(prefix="cnnlab-ltm-"))
    os.environ["CNNLAB_CACHE"] = str(work / "cache")
    large, small = work / "large", work / "small"
    t = time.perf_counter()
    make_folder(large, train_count, 2000, args.side)
    make_folder(small, train_count // 6, 2000, args.side)
    print(f"folders written in {time.perf_counter() - t:.0f} s: {train_count:,} training images "
          f"of {args.side}x{args.side} ({train_count * image / 2**30:.2f} GiB decoded) and "
          f"{train_count // 6:,}", file=sys.stderr)
    cgroup, peak_file = memory_cgroup(limit)
    try:
        result = {"limit_mib": args.limit_mib, "train_images": train_count,
                  "decoded_gib": round(train_count * image / 2**30, 2), "side": args.side,
                  "cpu": _cpu()}
        result["large_from_disk"] = train(large, work / "run-large", args.epochs, "auto",
                                          cgroup, work)
        result["large_from_disk"]["cgroup_peak_mib"] = \
            int((cgroup / peak_file).read_text()) >> 20
        for how in ("yes", "no"):  # the subset: decoded first, so the page cache is warm
            train(small, work / f"warm-{how}", 0.05, how, None, work)
            result[f"small_in_memory_{how}"] = train(small, work / f"run-{how}", 1, how, None,
                                                     work)
        result["disk_over_memory"] = round(result["small_in_memory_no"]["images_per_second"]
                                           / result["small_in_memory_yes"]["images_per_second"],
                                           3)
    finally:
        cgroup.rmdir()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
