"""What each built-in dataset is: where its files live, its classes and its statistics.

The one place for these facts. Each is torchvision's dataset of the same name, in
torchvision's layout under the data root, read from its official files. Mean/std are of the
training split, pixel values in [0, 1]: given here for the first three (as the earlier
releases trained with), computed from the decoded training split for the others.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str                 # torchvision's folder under the data root ("" = the root)
    kind: str                   # the format: data/formats.py reads each
    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W) of its images
    files: dict[str, tuple[str, ...]]  # split -> its official files
    download: tuple[str, dict[str, dict[str, Any]]]  # torchvision's class, split -> arguments
    mean: tuple[float, ...] | None = None  # None: the training split's, when decoded
    std: tuple[float, ...] | None = None
    option: str = ""            # what else picks the data: the labels or split read
    about: str = ""             # what it is, in a few words


IDX_KINDS = ("idx", "qmnist", "emnist")  # kinds of IDX files, in raw/, each raw or gzipped


def _idx(prefix: str = "", images: str = "images-idx3-ubyte", labels: str = "labels-idx1-ubyte",
         test: str = "t10k") -> dict[str, tuple[str, ...]]:
    return {"train": (f"{prefix}train-{images}", f"{prefix}train-{labels}"),
            "test": (f"{prefix}{test}-{images}", f"{prefix}{test}-{labels}")}


_TRAIN_FLAG = {"train": {"train": True}, "test": {"train": False}}
_DIGITS = tuple(string.digits)
_CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house "
    "kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle "
    "mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark "
    "shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm").split()
_CIFAR100_COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables "
    "household_electrical_devices household_furniture insects large_carnivores "
    "large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles "
    "small_mammals trees vehicles_1 vehicles_2").split()
# EMNIST's splits and their classes, as torchvision names them; "letters" without its
# unused class 0 (its labels 1-26 become 0-25)
_MERGED = set("cijklmopsuvwxyz")  # lower-case letters merged with their capitals
_EMNIST = {"balanced": tuple(sorted(set(string.digits + string.ascii_letters) - _MERGED)),
           "byclass": tuple(sorted(string.digits + string.ascii_letters)),
           "bymerge": tuple(sorted(set(string.digits + string.ascii_letters) - _MERGED)),
           "letters": tuple(string.ascii_lowercase), "digits": _DIGITS, "mnist": _DIGITS}


def _emnist(split: str) -> DatasetSpec:
    return DatasetSpec(
        f"emnist-{split}", "EMNIST", "emnist", _EMNIST[split], (1, 28, 28),
        _idx(f"emnist-{split}-", test="test"),
        ("EMNIST", {s: {"split": split, **a} for s, a in _TRAIN_FLAG.items()}),
        option=split, about=f"EMNIST's {split} split: handwritten "
                            f"{'letters' if split == 'letters' else 'characters'}, "
                            f"{len(_EMNIST[split])} classes, shown upright")


_SPECS = (
    DatasetSpec("mnist", "MNIST", "idx", _DIGITS, (1, 28, 28), _idx(), ("MNIST", _TRAIN_FLAG),
                (0.1307,), (0.3081,), about="handwritten digits"),
    DatasetSpec("fashion-mnist", "FashionMNIST", "idx",
                ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), (1, 28, 28), _idx(),
                ("FashionMNIST", _TRAIN_FLAG), (0.2860,), (0.3530,),
                about="Zalando's clothes, MNIST's format"),
    DatasetSpec("kmnist", "KMNIST", "idx",
                ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), (1, 28, 28),
                _idx(), ("KMNIST", _TRAIN_FLAG), about="Kuzushiji: cursive Japanese "
                                                         "characters, MNIST's format"),
    DatasetSpec("qmnist", "QMNIST", "qmnist", _DIGITS, (1, 28, 28),
                _idx("qmnist-", labels="labels-idx2-int", test="test"),
                ("QMNIST", {"train": {"what": "train"}, "test": {"what": "test"}}),
                about="MNIST reconstructed, with 50,000 more test digits"),
    *(_emnist(split) for split in _EMNIST),
    DatasetSpec("cifar10", "cifar-10-batches-py", "cifar",
                ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"), (3, 32, 32),
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                 "test": ("test_batch",)}, ("CIFAR10", _TRAIN_FLAG),
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                about="small photos, 10 classes"),
    DatasetSpec("cifar100", "cifar-100-python", "cifar100", tuple(_CIFAR100), (3, 32, 32),
                {"train": ("train", "meta"), "test": ("test", "meta")},
                ("CIFAR100", _TRAIN_FLAG), option="fine",
                about="small photos, 100 classes"),
    DatasetSpec("cifar100-coarse", "cifar-100-python", "cifar100", tuple(_CIFAR100_COARSE),
                (3, 32, 32), {"train": ("train", "meta"), "test": ("test", "meta")},
                ("CIFAR100", _TRAIN_FLAG), option="coarse",
                about="CIFAR-100's 20 superclasses"),
    DatasetSpec("svhn", "", "svhn", _DIGITS, (3, 32, 32),
                {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
                ("SVHN", {"train": {"split": "train"}, "test": {"split": "test"}}),
                about="Street View house numbers, cropped digits"),
    DatasetSpec("svhn-extra", "", "svhn", _DIGITS, (3, 32, 32),
                {"train": ("train_32x32.mat", "extra_32x32.mat"), "test": ("test_32x32.mat",)},
                ("SVHN", {"train": {"split": "train"}, "extra": {"split": "extra"},
                          "test": {"split": "test"}}),
                about="SVHN with its 531,131 extra training digits"),
    DatasetSpec("stl10", "stl10_binary", "stl10",
                ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck"), (3, 96, 96),
                {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")},
                ("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}),
                about="96x96 photos, its labelled splits"),
    DatasetSpec("usps", "", "usps", _DIGITS, (1, 16, 16),
                {"train": ("usps.bz2",), "test": ("usps.t.bz2",)}, ("USPS", _TRAIN_FLAG),
                about="16x16 postal digits"),
)
SPECS: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}
