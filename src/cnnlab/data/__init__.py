"""Datasets: find (or download) the official files, decode them once into a uint8 cache, and
hand them to training as whole arrays. See `loader.py` for the on-device batch loader."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CnnlabError, one_line
from ..limits import memory_available, size_text
from ..specs import IDX_KINDS, SPECS, DatasetSpec
from . import formats, python, readers
from .cache import Split, cached, fingerprint
from .photos import Photos
from .readers import show_path

FOLDER_PREFIX = "folder:"
DATASETS = (*SPECS, f"{FOLDER_PREFIX}PATH")


@dataclass
class Dataset:
    """A whole dataset in memory: uint8 images (N, C, H, W), int64 labels, and its facts.

    `digest` (16 hex digits) changes with any image, label or class name of any split: what
    a checkpoint keeps to tell whether it is resumed on the data it was trained on. A
    validation split (val_x, val_y) is a folder's val/, or held out by `hold_out`."""

    name: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_x: np.ndarray | Photos  # Photos: files decoded each epoch (data/photos.py)
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    digest: str
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    val_source: str | None = None  # "val/" (a folder's own) or "held out"
    streamed: bool = False  # larger than memory: decoded into the disk cache, read from there

    @classmethod
    def of(cls, name: str, classes: list[str], mean: tuple[float, ...],
           std: tuple[float, ...], train: Split, test: Split,
           val: Split | None = None) -> Dataset:
        """The dataset of its cached splits, with the digest of them all and the class names."""
        digests = [train.digest, test.digest, classes] + ([val.digest] if val else [])
        summary = json.dumps(digests).encode()
        return cls(name, classes, mean, std, train.images, train.labels, test.images,
                   test.labels, hashlib.blake2b(summary, digest_size=8).hexdigest(),
                   *((val.images, val.labels, "val/") if val else ()))

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])


def from_python(data: object) -> Dataset:
    """A dataset handed over from Python (data/python.py), named `python:<digest>`."""
    train, test, classes = python.arrays(data)
    found = Dataset.of(python.PREFIX, classes, train.mean, train.std, train, test)
    return dataclasses.replace(found, name=f"{python.PREFIX}{found.digest[:12]}")


def load_dataset(name: str, data_dir: str | Path, *, download: bool = True,
                 skip_bad_files: bool = False, image_size: tuple[int, int] | None = None,
                 progress: bool = True, in_memory: str = "auto", photos: bool = False
                 ) -> Dataset:
    """Load a named dataset (specs.SPECS: under data_dir, torchvision's layout) or
    `folder:PATH` (PATH/train/<class>/*, PATH/test/<class>/*, optionally PATH/val/<class>/*),
    a folder's images resized and centre-cropped to `image_size` (height, width) if given.
    With `progress`, the long phases of a first load (decoding a folder of images, reading
    a moved dataset to find its cache) show their progress on stderr. `in_memory` (a
    folder's): "yes", "no" or "auto" - see _streams. `photos` (a folder's, with
    `image_size`): its training images stay files, decoded each epoch (data/photos.py)."""
    if python.is_python(name):
        raise python.not_on_disk(name)
    if name.startswith(FOLDER_PREFIX):
        return _load_folder(name, Path(name[len(FOLDER_PREFIX):]).expanduser(), skip_bad_files,
                            image_size, progress, in_memory, photos)
    spec = SPECS.get(name)
    if spec is None:
        raise CnnlabError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    root = Path(data_dir).expanduser()
    folder = root / spec.folder / ("raw" if spec.kind in IDX_KINDS else "")
    if not _present(spec, folder):
        if not download:
            raise CnnlabError(f"{name} not found: expected {_expected(spec)} in "
                              f"{show_path(folder)}; "
                              "run without --no-download to fetch it, or point --data-dir "
                              f"(or CNNLAB_DATA) at the folder that holds "
                              f"{spec.folder + '/' if spec.folder else 'them'}")
        _download(spec, root, folder)
    splits = {}
    for split, files in spec.files.items():
        sources = [(readers.find_idx(folder, f) if spec.kind in IDX_KINDS else folder / f)
                   for f in files]
        splits[split] = cached(folder, f"{spec.name}-{split}", sources, "", len(spec.classes),
                               lambda s=split: formats.read_split(spec, folder, s),
                               phase=f"hashing {name}/{split}" if progress else None)
    train = splits["train"]
    return Dataset.of(name, list(spec.classes), spec.mean or train.mean,
                      spec.std or train.std, train, splits["test"])


def _files(spec: DatasetSpec) -> list[str]:
    return list(dict.fromkeys(f for files in spec.files.values() for f in files))


def _expected(spec: DatasetSpec) -> str:
    """The official files' names; an IDX file may as well be gzipped, as it is downloaded."""
    gz = " (or .gz)" if spec.kind in IDX_KINDS else ""
    return ", ".join(f"{f}{gz}" for f in _files(spec))


def _present(spec: DatasetSpec, folder: Path) -> bool:
    """Whether all official files are there; one there that is no file to read (a link to
    nothing, a folder) is an error naming it."""
    names = _files(spec)
    gz = [f"{f}.gz" for f in names] if spec.kind in IDX_KINDS else []
    for path in (folder / f for f in names + gz):
        if os.path.lexists(path) and (problem := readers.file_problem(path)):
            raise CnnlabError(f"{show_path(path)} cannot be read ({problem}); remove it, or put "
                              "the real file there")
    if spec.kind in IDX_KINDS:
        return all(readers.find_idx(folder, f) for f in names)
    return all((folder / f).is_file() for f in names)


def _download(spec: DatasetSpec, root: Path, folder: Path) -> None:
    """Fetch the official files with torchvision (its mirrors, checksums verified)."""
    from torchvision import datasets

    dataset, splits = spec.download
    new = [p for p in (folder, *folder.parents) if not p.exists()]  # what a download creates
    try:
        for arguments in splits.values():
            getattr(datasets, dataset)(str(root), download=True, **arguments)
    except Exception as e:  # network errors come in many types; all mean the same here
        for path in new:  # a failed download leaves no empty folders behind (a wrong
            try:          # --data-dir would otherwise keep an empty MNIST/raw)
                path.rmdir()
            except OSError:
                break
        raise CnnlabError(f"could not download {spec.name} ({one_line(e)}); without a network, "
                          f"put {_expected(spec)} into {show_path(folder)}") from None
    if not _present(spec, folder):
        raise CnnlabError(f"download of {spec.name} did not produce {_expected(spec)} in "
                          f"{show_path(folder)}")


def check_folder(root: Path) -> None:
    """Refuse, in one line naming it, a dataset folder that is not there."""
    if not root.is_dir():
        what = "is not a folder" if os.path.lexists(root) else "does not exist"
        raise CnnlabError(f"dataset folder {show_path(root)} {what}")


def _load_folder(name: str, root: Path, skip_bad_files: bool,
                 image_size: tuple[int, int] | None = None, progress: bool = True,
                 in_memory: str = "auto", as_photos: bool = False) -> Dataset:
    check_folder(root)
    classes = readers.folder_classes(root)
    n = len(classes)
    train_files = readers.folder_files(root / "train", classes, require_all=True)
    test_files = readers.folder_files(root / "test", classes, require_all=False)
    val_files = readers.folder_files(root / "val", classes, require_all=False) \
        if (root / "val").is_dir() else None  # a validation split of its own
    # the class names in order: which label each class folder's images get
    extra = f"{json.dumps(classes)}:skip={skip_bad_files}"
    fit = None if image_size is None else (image_size[1], image_size[0])  # Pillow's (w, h)
    if fit:
        extra += f":crop={fit}"
    shape = image_size or readers.header_size(train_files[0][0])
    shown = show_path(os.path.basename(os.path.realpath(root)))
    # photos: the training split stays files; a sample of it is decoded (its statistics)
    decoded = _sample(train_files) if as_photos else train_files
    stream = _streams(shown, len(decoded), len(test_files) + len(val_files or ()), shape,
                      in_memory, None if not as_photos else len(train_files))
    pixels = 3 * math.prod(shape) if shape else 0

    def split_of(split: str, files: list, options: str, **how) -> Split:
        """The split cached, or decoded as `how` says (read_folder_split's options): into
        memory, or with `stream` straight into the cache."""
        said = dict(crop=bool(fit), skip_bad=skip_bad_files,
                    progress=f"decoding {shown}/{split}" if progress else None, **how)
        return cached(root, f"folder-{split}", [p for p, _ in files], options, n,
                      lambda: readers.read_folder_split(files, **said),
                      phase=f"hashing {shown}/{split}" if progress else None,
                      stream=(lambda path: readers.stream_folder_split(files, path, **said))
                      if stream else None, size=len(files) * pixels)

    train = split_of("sample" if as_photos else "train", decoded, extra, size=fit)
    empty = [c for c, count in zip(classes, np.bincount(train.labels, minlength=n)) if not count]
    if empty and not as_photos:
        raise CnnlabError(f"class folder {show_path(root / 'train' / empty[0])} has no readable "
                          "images left; fix its files or remove the folder")
    # the other splits are read as the training split was: same mode, same size
    mode = "L" if train.images.shape[1] == 1 else "RGB"
    size = (train.images.shape[3], train.images.shape[2])
    test = split_of("test", test_files, f"{extra}:{mode}{size}", mode=mode, size=size)
    val = None if val_files is None else \
        split_of("val", val_files, f"{extra}:{mode}{size}", mode=mode, size=size)
    if as_photos:  # the files as they are, named by their content
        key = fingerprint(root, "folder-photos", [p for p, _ in train_files], extra,
                          f"hashing {shown}/train" if progress else None)
        train = Split(Photos.of([p for p, _ in train_files], size[::-1], mode, train.images),
                      np.array([label for _, label in train_files], dtype=np.int64), key,
                      train.mean, train.std)
    found = Dataset.of(name, classes, train.mean, train.std, train, test, val)
    return dataclasses.replace(found, streamed=stream)


SAMPLE = 1000  # training photos decoded once: their channel statistics normalise the data


def _sample(files: list) -> list:
    """SAMPLE files spread evenly over a split's (every class's) files; all of a small one."""
    return files[::max(1, len(files) // SAMPLE)][:SAMPLE]


def _streams(name: str, train: int, test: int, image_size: tuple[int, int] | None,
             in_memory: str, photos: int | None = None) -> bool:
    """Before decoding a folder, whether its splits go to the disk cache a block at a time
    (and train from there) rather than into memory: with `in_memory` "no", or "auto" where
    they (uint8, three channels at most; the training split twice while it is put together)
    would take more memory than this process may use - which "yes" refuses in one line.
    Said in one line, with why, where it is not the default (or takes a GiB of memory or
    more): which way the data comes to training. `image_size`: (H, W), None where the first
    image's header could not be read (its error comes when it is decoded); `photos`: the
    count of training photos decoded each epoch, whose sample of `train` images is decoded
    once."""
    if image_size is None:
        return in_memory == "no"
    pixels = 3 * image_size[0] * image_size[1]
    size, peak = (train + test) * pixels, (2 * train + test) * pixels
    available, bound = memory_available()
    shape = f"{image_size[0]}x{image_size[1]}"
    what = (f"{name} decodes to {size_text(size)} ({train + test:,} images of {shape} "
            f"pixels, {size_text(peak)} while decoding)")
    if photos is not None:
        what = (f"{name}: its {photos:,} training photos are decoded each epoch by worker "
                "processes (--workers), as random resized crops are cut from the "
                f"full-resolution images; a sample of {train:,} and the {test:,} test images "
                f"decode to {size_text(size)} at {shape} pixels")
    if in_memory == "no" or (peak > available and in_memory == "auto"):
        why = ("--in-memory no" if in_memory == "no" else
               f"more than {bound} leaves ({size_text(available)})")
        print(f"cnnlab: note: {what}, {why}: decoding {'them' if photos else 'it'} into the "
              "disk cache a block at a time and training from there, a few batches read ahead",
              file=sys.stderr)
        return True
    if peak > available:
        raise CnnlabError(f"{what}, more than {bound} leaves ({size_text(available)}); pass "
                          "a smaller --image-size, free memory, or --in-memory auto to train "
                          "from the disk cache")
    if photos is not None or size >= 2**30:  # the default way, quiet unless it takes much
        print(f"cnnlab: note: {what}, held in memory ({size_text(available)} free)",
              file=sys.stderr)
    return False


def hold_out(data: Dataset, fraction: float, seed: int) -> Dataset:
    """`data` with `fraction` of each class's training images moved to a validation split,
    drawn with `seed` (stratified: every class keeps its share); `data` itself when
    fraction is 0. A fraction that leaves some class without a validation image (rounded to
    none: 0.5 of one image) or without a training image is refused, as a model chosen on a
    validation split that lacks a class is not chosen on the task. The digest stays the
    dataset's: the split follows from it and the config."""
    if not fraction:
        return data
    if data.streamed or isinstance(data.train_x, Photos):
        where = "photos decoded each epoch" if isinstance(data.train_x, Photos) \
            else "the disk cache"
        raise CnnlabError(f"--val-split {fraction:g}: {data.name} trains from {where}, "
                          "of which no images are held out; give the folder a val/ split of "
                          "its own instead")
    if data.val_x is not None:
        raise CnnlabError(f"--val-split {fraction:g}: {data.name} has a val/ folder of its own, "
                          "which is the validation split; drop --val-split (or remove val/)")
    counts = np.bincount(data.train_y, minlength=len(data.classes)).tolist()
    takes = [int(round(fraction * count)) for count in counts]
    bad = [c for c, (take, count) in enumerate(zip(takes, counts)) if not 0 < take < count]
    if bad:
        c = min(bad, key=counts.__getitem__)  # one of under 2 images: no fraction helps it
        if counts[c] < 2:
            fix = ("a class needs 2 training images or more for a validation split: add images "
                   "to it, or drop --val-split")
        else:  # the fractions that give every class both (never none: 0.5 is one of them)
            low = max(math.ceil(100 / count) for count in counts) / 100
            high = min(math.floor(100 * (count - 1) / count) for count in counts) / 100
            fix = f"choose a --val-split from {low:g} to {high:g}, or drop it"
        raise CnnlabError(f"--val-split {fraction:g} leaves class '{data.classes[c]}' "
                          f"({counts[c]} training image{'' if counts[c] == 1 else 's'}) with no "
                          f"{'training' if takes[c] else 'validation'} images; {fix}")
    rng = np.random.default_rng(seed)
    val = np.zeros(len(data.train_y), dtype=bool)
    for c, take in enumerate(takes):
        val[rng.permutation(np.flatnonzero(data.train_y == c))[:take]] = True
    return dataclasses.replace(data, train_x=data.train_x[~val], train_y=data.train_y[~val],
                               val_x=data.train_x[val], val_y=data.train_y[val],
                               val_source="held out")
