"""What each built-in dataset is: where its files live, its classes and its statistics.

The one place for these facts. Mean/std are of the training split, pixel values in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str                 # torchvision's folder name under the data root
    kind: str                   # "idx" or "cifar"
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: dict[str, tuple[str, ...]]  # split -> (images, labels) for IDX; batch files for cifar


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", "MNIST", "idx", tuple(str(i) for i in range(10)),
        (0.1307,), (0.3081,), _IDX_FILES),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "FashionMNIST", "idx",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (0.2860,), (0.3530,), _IDX_FILES),
    "cifar10": DatasetSpec(
        "cifar10", "cifar-10-batches-py", "cifar",
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}),
}
