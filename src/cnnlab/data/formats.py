"""The official files of torchvision's named datasets, read into uint8 images (N, C, H, W)
and int64 labels from 0: IDX (MNIST and its kin, QMNIST's int32 labels, EMNIST's transposed
images), CIFAR's pickled batches (through the safe unpickler), SVHN's MATLAB files, STL-10's
raw binaries, USPS's bzip2 text. Nothing is unpickled but plain arrays; every damaged file is
one line naming it."""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np

from ..errors import CnnlabError, one_line
from ..specs import IDX_KINDS, DatasetSpec
from .readers import (
    check_labels,
    find_idx,
    read_cifar_split,
    read_idx,
    safe_unpickle,
    show_path,
)

_AGAIN = "delete it and download again"


def read_split(spec: DatasetSpec, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Split `split` ("train", "test") of dataset `spec`, from its files in `folder`."""
    files, n = spec.files[split], len(spec.classes)
    if spec.kind == "cifar":
        return read_cifar_split(folder, files, n)
    if spec.kind in IDX_KINDS:
        return _idx_split(spec, folder, *files)
    if spec.kind == "stl10":
        x, y = _stl10(spec, folder / files[0], folder / files[1])
    else:  # a file a part (the meta file of CIFAR-100 holds no images)
        reader = {"cifar100": _cifar100, "svhn": _svhn, "usps": _usps}[spec.kind]
        parts = [reader(spec, folder / f) for f in files if f != "meta"]
        x, y = (np.concatenate([part[i] for part in parts]) for i in (0, 1))
    check_labels(y, n, folder / files[0])
    return x, y


def _mismatch(images: Path, labels: Path, x: np.ndarray, y: np.ndarray, expected: str
              ) -> CnnlabError:
    return CnnlabError(f"{show_path(images)} and {show_path(labels)} do not match: images "
                       f"{x.shape}, labels {y.shape}, expected {expected}; {_AGAIN}")


def _idx_split(spec: DatasetSpec, folder: Path, images: str, labels: str
               ) -> tuple[np.ndarray, np.ndarray]:
    paths = [find_idx(folder, images), find_idx(folder, labels)]
    if None in paths:
        raise CnnlabError(f"missing {images} or {labels} in {show_path(folder)}")
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if spec.kind == "qmnist":  # a row of 8 facts an image; the first is its class
        if y.ndim != 2 or y.shape[1] != 8:
            raise _mismatch(*paths, x, y, "QMNIST's (N, 8) label rows")
        y = y[:, 0]
    if x.ndim != 3 or 0 in x.shape or y.shape != (len(x),):
        raise _mismatch(*paths, x, y, "(N, H, W) and (N,) with N, H, W > 0")
    y = y.astype(np.int64)
    if spec.option == "letters":  # labels 1-26: torchvision's class 0 is unused
        y = y - 1
    check_labels(y, len(spec.classes), paths[1])
    if spec.kind == "emnist":  # stored transposed: upright, as a user's own images are
        x = x.transpose(0, 2, 1)
    return np.array(x[:, None]), y  # a copy: read_idx's array is read-only


def _cifar100(spec: DatasetSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-100 python file: a dict with b'data' and b'fine_labels' / b'coarse_labels'."""
    key = f"{spec.option}_labels".encode()
    try:
        batch = safe_unpickle(path)
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[key])
    except FileNotFoundError:
        raise CnnlabError(f"missing CIFAR-100 file {show_path(path)}") from None
    except Exception as e:  # a damaged pickle raises many types; all mean the same here
        raise CnnlabError(f"{show_path(path)} is not a valid CIFAR-100 file "
                          f"({one_line(e)}); {_AGAIN}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CnnlabError(f"{show_path(path)} has data {data.dtype} {data.shape} and labels "
                          f"{labels.shape}; expected uint8 (N, 3072) and N integers; {_AGAIN}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _svhn(spec: DatasetSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN MATLAB file: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=("X", "y"))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    except FileNotFoundError:
        raise CnnlabError(f"missing SVHN file {show_path(path)}") from None
    except Exception as e:  # scipy raises many types for a damaged file
        raise CnnlabError(f"{show_path(path)} is not a valid SVHN file ({one_line(e)}); "
                          f"{_AGAIN}") from None
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or y.shape != (x.shape[3],):
        raise CnnlabError(f"{show_path(path)} has X {x.dtype} {x.shape} and y {y.shape}; "
                          f"expected uint8 (32, 32, 3, N) and N labels; {_AGAIN}")
    y = y.astype(np.int64)
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def _stl10(spec: DatasetSpec, images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """STL-10's binaries: images as bytes, each 3 x 96 x 96 column by column; labels 1-10."""
    c, h, w = spec.shape
    try:
        x = np.fromfile(images, dtype=np.uint8)
        y = np.fromfile(labels, dtype=np.uint8).astype(np.int64) - 1
    except FileNotFoundError as e:
        raise CnnlabError(f"missing STL-10 file {show_path(e.filename)}") from None
    if x.size % (c * h * w) or x.size // (c * h * w) != len(y) or not len(y):
        raise CnnlabError(f"{show_path(images)} holds {x.size:,} bytes and {show_path(labels)} "
                          f"{len(y):,} labels; expected {c * h * w:,} bytes an image, one label "
                          f"each; {_AGAIN}")
    return np.ascontiguousarray(x.reshape(-1, c, w, h).transpose(0, 1, 3, 2)), y


def _usps(spec: DatasetSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """USPS in LIBSVM's text format, bzip2'd: a line an image, `label 1:v ... 256:v`, the
    values in [-1, 1] and the labels 1-10 for the digits 0-9."""
    side = spec.shape[1]
    images, labels = [], []
    try:
        with bz2.open(path, "rt") as f:
            for line in f:
                label, *cells = line.split()
                values = np.zeros(side * side)
                for cell in cells:
                    index, value = cell.split(":")
                    values[int(index) - 1] = float(value)
                images.append(values)
                labels.append(int(float(label)) - 1)
    except FileNotFoundError:
        raise CnnlabError(f"missing USPS file {show_path(path)}") from None
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise CnnlabError(f"{show_path(path)} is not a valid USPS file ({one_line(e)}); "
                          f"{_AGAIN}") from None
    if not images:
        raise CnnlabError(f"{show_path(path)} holds no images; {_AGAIN}")
    x = np.clip((np.stack(images) + 1) / 2 * 255, 0, 255).round().astype(np.uint8)
    return x.reshape(-1, 1, side, side), np.asarray(labels, dtype=np.int64)
