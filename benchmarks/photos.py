"""Photos decoded each epoch (--augment resized-crop): how fast the loader makes 224x224
training views of full-resolution JPEGs by the number of DataLoader workers, against the
in-memory loader's batches of the same size (the ceiling: no decoding at all); then whole
training runs of a small model, where the loader is what limits, photos against the
in-memory path.

    python benchmarks/photos.py [--images 2000] [--out photos.json]

A synthetic folder of photo-sized JPEGs (sides of 300 to 500 pixels, quality 90: about the
size of ImageNet's) is written to a temporary folder; the page cache is warm for every
figure. Every figure is measured in this run, one after another: compare them only as
ratios."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = 10


def _write_images(job: tuple[Path, int, int]) -> None:
    """Photo-like images of class k: a smooth gradient, some noise, a bright block at a
    class-specific place."""
    from PIL import Image

    folder, start, count = job
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        k = i % CLASSES
        h, w = (int(v) for v in rng.integers(300, 500, 2))
        ramp = np.linspace(0, 150, w, dtype=np.float32)[None, :, None]
        pixels = ramp + rng.normal(0, 20, (h, w, 3)).astype(np.float32)
        r, c = (k // 5) * h // 2 + h // 8, (k % 5) * w // 5
        pixels[r:r + h // 4, c:c + w // 6] = 255
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"class{k}" / f"{i:06d}.jpg", quality=90)


def make_folder(root: Path, train: int, test: int) -> None:
    jobs = []
    for split, count, offset in (("train", train, 0), ("test", test, 10**7)):
        for k in range(CLASSES):
            (root / split / f"class{k}").mkdir(parents=True, exist_ok=True)
        jobs += [(root / split, offset + s, min(250, count - s)) for s in range(0, count, 250)]
    with multiprocessing.Pool() as pool:
        pool.map(_write_images, jobs)


def loader_speed(root: Path, workers: int | None, side: int = 224) -> float:
    """Views a second over one epoch after a warm-up epoch: PhotoLoader with `workers`,
    or (None) the in-memory loader over the centre crops cached at the same size."""
    import torch

    from cnnlab.data import load_dataset
    from cnnlab.data.loader import DeviceLoader
    from cnnlab.data.photos import PhotoLoader

    data = load_dataset(f"folder:{root}", root, image_size=(side, side),
                        photos=workers is not None, progress=False)
    common = dict(batch_size=64, mean=data.mean, std=data.std, device=torch.device("cpu"),
                  shuffle=True, generator=torch.Generator().manual_seed(0))
    if workers is None:
        held = load_dataset(f"folder:{root}", root, image_size=(side, side), progress=False)
        loader = DeviceLoader(torch.from_numpy(held.train_x), torch.from_numpy(held.train_y),
                              augment=frozenset({"flip"}), **common)
    else:
        torch.set_num_threads(1)
        loader = PhotoLoader(data.train_x, torch.from_numpy(data.train_y), seed=0,
                             augment=frozenset({"resized-crop", "flip"}), workers=workers,
                             **common)
    for epoch in (1, 2):  # the first warms the page cache and starts the workers
        start, count = time.perf_counter(), 0
        for x, _ in loader.batches(loader.new_order(), 0, epoch):
            count += len(x)
    return round(count / (time.perf_counter() - start), 1)


def train(root: Path, out: Path, augment: str, side: int) -> dict:
    """A whole `cnnlab train lenet5` run, one epoch at side x side; its summary's speed."""
    command = [sys.executable, "-m", "cnnlab", "train", "lenet5", f"folder:{root}",
               "--image-size", str(side), "--augment", augment, "--epochs", "1",
               "--batch-size", "64", "--telemetry", "0", "--quiet", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr)
    summary = json.loads((out / "summary.json").read_text())
    return {"images_per_second": summary["images_per_second"],
            "train_seconds": summary["train_seconds"],
            "notes": [line for line in result.stderr.splitlines() if "note" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training photos")
    parser.add_argument("--out", help="write the figures to this JSON file too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        make_folder(root, args.images, args.images // 10)
        result = {"cpu": _cpu(), "images": args.images,
                  "in_memory_224": loader_speed(root, None)}
        for workers in (0, 1, 2):
            result[f"photos_224_workers_{workers}"] = loader_speed(root, workers)
        for augment, side in (("crop,flip", 64), ("resized-crop,flip", 64)):
            train(root, Path(tmp) / f"warm-{augment}", augment, side)  # caches, page cache
            result[f"lenet5_64_{augment}"] = train(root, Path(tmp) / augment, augment, side)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
