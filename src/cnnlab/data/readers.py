"""Readers for the official formats: IDX (MNIST, Fashion-MNIST), CIFAR pickle batches and
image folders. Each returns uint8 images as (N, C, H, W) and int64 labels, or raises
CnnlabError naming the bad file and what is wrong with it."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import CnnlabError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm"}


def find_idx(folder: Path, name: str) -> Path | None:
    """The IDX file `name`, raw or gzipped, in `folder` (raw preferred)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally .gz) into an array of its declared shape."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise CnnlabError(f"cannot read {path}: {e}; delete it and download again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CnnlabError(f"{path} is not an IDX file (bad magic number); "
                          "delete it and download again")
    if data[2] != 0x08:
        raise CnnlabError(f"{path} holds IDX type 0x{data[2]:02x}; only unsigned bytes (0x08) "
                          "are supported")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CnnlabError(f"{path} is truncated (header incomplete); delete it and download again")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise CnnlabError(f"{path} is {what} ({len(data)} bytes, expected {expected}); "
                          "delete it and download again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(folder: Path, images: str, labels: str, num_classes: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    paths = [find_idx(folder, images), find_idx(folder, labels)]
    if None in paths:
        raise CnnlabError(f"missing {images} or {labels} in {folder}")
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise CnnlabError(f"{paths[0]} and {paths[1]} do not match: images {x.shape}, "
                          f"labels {y.shape}; delete them and download again")
    _check_labels(y, num_classes, paths[1])
    return x[:, None].copy(), y.astype(np.int64)  # copy: frombuffer arrays are read-only


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a crafted file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (a pickled dict with b'data' and b'labels')."""
    try:
        with path.open("rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise CnnlabError(f"missing CIFAR batch {path}") from None
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError,
            IndexError, AttributeError) as e:
        raise CnnlabError(f"{path} is not a valid CIFAR batch ({e}); "
                          "delete it and download again") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise CnnlabError(f"{path} has data {data.shape} and {len(labels)} labels; expected "
                          "(N, 3072) and N; delete it and download again")
    _check_labels(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_split(folder: Path, names: tuple[str, ...], num_classes: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_cifar_batch(folder / n, num_classes) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CnnlabError(f"{path} has labels outside 0..{num_classes - 1} "
                          f"(found {labels.min()}..{labels.max()})")


# ---------------------------------------------------------------- image folders

def folder_classes(root: Path) -> list[str]:
    """Class names of an image-folder dataset: the subfolders of train/, sorted."""
    train = root / "train"
    if not train.is_dir() or not (root / "test").is_dir():
        raise CnnlabError(f"{root} must hold train/ and test/ folders, each with one "
                          "subfolder of images per class")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise CnnlabError(f"{train} has no class subfolders; put each class's images in "
                          f"{train}/<class>/")
    unknown = sorted(d.name for d in (root / "test").iterdir()
                     if d.is_dir() and not d.name.startswith(".") and d.name not in classes)
    if unknown:
        raise CnnlabError(f"{root / 'test'} has classes not in train/: {', '.join(unknown)}")
    return classes


def folder_files(split_dir: Path, classes: list[str], *, require_all: bool
                 ) -> list[tuple[Path, int]]:
    """(path, label) for every image file under split_dir/<class>/, in a stable order."""
    files = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            if require_all:
                raise CnnlabError(f"class folder {class_dir} is missing")
            continue
        found = sorted(p for p in class_dir.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not found and require_all:
            raise CnnlabError(f"class folder {class_dir} has no images "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        files.extend((p, label) for p in found)
    if not files:
        raise CnnlabError(f"{split_dir} has no images")
    return files


def _probe(path: Path) -> tuple[str, tuple[int, int]] | str:
    """(mode, size) from the image header (the size as decode_image turns it: EXIF
    orientations 5-8 swap width and height), or why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
            return im.mode, (width, height)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        return f"cannot read image {path}: {e}"


def _to_8bit(im):
    """16-bit and 32-bit grayscale scaled down to 8 bits (Pillow would clip them)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        return Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    return im


def decode_image(path: str | Path, mode: str, size: tuple[int, int] | None = None
                 ) -> np.ndarray:
    """An image file as uint8 (C, H, W), decoded as in training and prediction alike: turned
    as its EXIF orientation says, 16/32-bit grayscale scaled to 8 bits, a transparent
    background made white, converted to `mode` (Pillow's "L" or "RGB") and, with `size`
    (width, height), resized bilinearly. Pillow's errors pass through."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_8bit(im)
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        im = im.convert(mode)
        if size is not None and im.size != tuple(size):
            im = im.resize(tuple(size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode(path: Path, mode: str) -> np.ndarray | str:
    try:
        return decode_image(path, mode)
    except Exception as e:  # Pillow raises many types for bad files; all mean the same here
        return f"cannot decode image {path}: {e}"


def read_folder_split(files: list[tuple[Path, int]], *, mode: str | None = None,
                      size: tuple[int, int] | None = None, skip_bad: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image to uint8 (N, C, H, W), in threads (Pillow releases the GIL).

    `mode` (Pillow's "L" or "RGB") and `size` (width, height) default to what the files
    show: "L" if every image is grayscale, and the most common size. An unreadable image or
    one of another size stops with an error naming it, or with `skip_bad` is reported on
    stderr and left out."""
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        probes = list(pool.map(_probe, (p for p, _ in files)))
        good = [p for p in probes if not isinstance(p, str)]
        if mode is None:
            mode = "L" if good and all(m in ("L", "1", "I;16") for m, _ in good) else "RGB"
        if size is None and good:
            size = Counter(s for _, s in good).most_common(1)[0][0]
        problems = {}
        for (path, _), probe in zip(files, probes):
            if isinstance(probe, str):
                problems[path] = probe
            elif probe[1] != size:
                problems[path] = (f"image {path} is {probe[1][0]}x{probe[1][1]} but the "
                                  f"dataset's images are {size[0]}x{size[1]}")
        kept = [(p, label) for p, label in files if p not in problems]
        decoded = list(pool.map(lambda p: _decode(p, mode), (p for p, _ in kept)))
    for (path, _), arr in zip(kept, decoded):
        if isinstance(arr, str):
            problems[path] = arr
    if problems and not skip_bad:
        first = next(iter(problems.values()))
        more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        raise CnnlabError(f"{first}{more}; fix or remove it, or pass --skip-bad-files")
    for message in problems.values():
        print(f"cnnlab: skipping: {message}", file=sys.stderr)
    pairs = [(arr, label) for (_, label), arr in zip(kept, decoded) if not isinstance(arr, str)]
    if not pairs:
        raise CnnlabError(f"no readable images among {len(files)} files")
    return (np.stack([a for a, _ in pairs]),
            np.array([label for _, label in pairs], dtype=np.int64))


def _workers() -> int:
    return min(8, (os.cpu_count() or 1) + 2)

