"""Data handed over from Python (a notebook): `(x_train, y_train, x_test, y_test)` arrays or
tensors, or `(train, test)` map-style torch Datasets of `(image, label)`, made the Dataset
the loop trains on - uint8 images (N, C, H, W), labels from 0. Its name, `python:<digest>`,
says what it was; nothing of it is on disk, so a run resumes only with the same data passed
again (the checkpoint's data digest tells)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CnnlabError
from .cache import Split, channel_stats, content_digest

PREFIX = "python:"
_HOW = ("give (x_train, y_train, x_test, y_test) - arrays or tensors of images (N, H, W), "
        "(N, C, H, W) or (N, H, W, C) and integer labels - or (train, test) torch Datasets of "
        "(image, label)")


def is_python(name: str) -> bool:
    return name.startswith(PREFIX)


def not_on_disk(name: str) -> CnnlabError:
    return CnnlabError(f"dataset {name} was handed over from Python and is not on disk; pass "
                       "the same data again: cnnlab.train(resume=RUN_DIR, dataset=DATA)")


def arrays(data: Any) -> tuple[Split, Split, list[str]]:
    """The training and test splits of `data` as a notebook holds it (see the module's
    notes), and the class names (a torch Dataset's `classes`, else 0 .. K-1)."""
    if not isinstance(data, tuple | list) or len(data) not in (2, 4):
        raise CnnlabError(f"dataset: {_HOW}")
    if len(data) == 2:
        (train_x, train_y), (test_x, test_y) = (_items(d, s) for d, s in zip(data, _SPLITS))
        classes = _class_names(getattr(data[0], "classes", None), train_y, test_y)
    else:
        train_x, test_x = (_images(x, s) for x, s in zip(data[0::2], _SPLITS))
        train_y, test_y = (_labels(y, len(x), s)
                           for y, x, s in zip(data[1::2], (train_x, test_x), _SPLITS))
        classes = _class_names(None, train_y, test_y)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise CnnlabError(f"dataset: the training images are {_shape(train_x)} and the test "
                          f"images {_shape(test_x)}; they must be alike")
    train, test = (Split(x, y, content_digest(x, y), *channel_stats(x))
                   for x, y in ((train_x, train_y), (test_x, test_y)))
    return train, test, classes


_SPLITS = ("training", "test")


def _shape(x: np.ndarray) -> str:
    return "x".join(map(str, x.shape[1:]))


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _images(value: Any, split: str) -> np.ndarray:
    """Images as uint8 (N, C, H, W): uint8 as they are, floats in [0, 1] (ToTensor's scale)
    times 255."""
    x = _array(value)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or not len(x) or min(x.shape[2:]) < 1:
        raise CnnlabError(f"dataset: the {split} images have shape {x.shape}; expected (N, H, W),"
                          " (N, C, H, W) or (N, H, W, C) with 1 or 3 channels and N > 0")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise CnnlabError(f"dataset: the {split} images are {x.dtype}; give uint8 (0-255) or "
                          "floats in [0, 1]")
    low, high = float(x.min()), float(x.max())
    integers = np.issubdtype(x.dtype, np.integer)
    if not np.isfinite([low, high]).all() or low < 0 or high > (255 if integers else 1):
        raise CnnlabError(f"dataset: the {split} images run from {low:g} to {high:g}; give "
                          "uint8 (0-255) or floats in [0, 1] (before any normalisation: "
                          "cnnlab normalises them itself)")
    scale = 1 if integers else 255
    return np.ascontiguousarray(np.round(x * scale).astype(np.uint8))


def _labels(value: Any, count: int, split: str) -> np.ndarray:
    y = _array(value)
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels
        y = y[:, 0]
    if y.ndim != 1 or len(y) != count:
        raise CnnlabError(f"dataset: {count:,} {split} images but labels of shape {y.shape}; "
                          "give one integer label an image")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise CnnlabError(f"dataset: the {split} labels must be integers from 0 (the class "
                          f"index), not {y.dtype} {y.min() if len(y) else ''}")
    return y.astype(np.int64)


def _items(dataset: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (image, label) items of a map-style dataset, as arrays."""
    try:
        count = len(dataset)
        items = [dataset[i] for i in range(count)]
    except TypeError:
        raise CnnlabError(f"dataset: the {split} set is no map-style dataset (len() and "
                          f"[i]); {_HOW}") from None
    if not items or not all(isinstance(i, tuple | list) and len(i) == 2 for i in items):
        raise CnnlabError(f"dataset: the {split} set's items must be (image, label) pairs")
    images = [_array(image) for image, _ in items]
    first = images[0]
    if first.ndim == 3 and first.shape[0] not in (1, 3) and first.shape[2] in (1, 3):
        images = [i.transpose(2, 0, 1) for i in images]  # a PIL image's (H, W, C)
    if any(i.shape != images[0].shape for i in images):
        raise CnnlabError(f"dataset: the {split} set's images differ in shape; resize them "
                          "alike (torchvision.transforms.Resize) or use a folder and "
                          "--image-size")
    labels = [int(label) for _, label in items]
    return _images(np.stack(images), split), _labels(np.asarray(labels), count, split)


def _class_names(names: Any, *labels: np.ndarray) -> list[str]:
    """The class names: the dataset's own (torchvision's `classes`), else 0 .. K-1."""
    count = int(max(y.max() for y in labels)) + 1
    if isinstance(names, list | tuple) and len(names) >= count and \
            all(isinstance(n, str) for n in names):
        return list(names)
    return [str(i) for i in range(count)]
