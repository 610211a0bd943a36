"""Readers for the official formats: IDX (MNIST, Fashion-MNIST), CIFAR pickle batches and
image folders. Each returns uint8 images as (N, C, H, W) and int64 labels, or raises
CnnlabError naming the bad file and what is wrong with it.

Hostile input is bad input like any other: a file name that is not UTF-8 or holds control
characters is shown escaped (`show_path`), a broken link, a link loop, a folder or a FIFO
where an image should be and an image Pillow refuses (a decompression bomb) are unreadable
images, and a .gz file cannot inflate to more than its IDX header declares."""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import math
import multiprocessing
import os
import pickle
import stat
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from ..errors import CnnlabError, one_line
from ..progress import Phase
from .disk import DiskArray, write_header

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm"}
_IMAGE_ENDINGS = tuple(IMAGE_SUFFIXES)  # for str.endswith
MAX_IDX_BYTES = 1 << 34  # 16 GiB: MNIST's largest file is 47 MB


def show_path(path: str | os.PathLike[str]) -> str:
    """`path` as text that prints on any terminal and stays on one line: as it is when every
    character is printable, else quoted, with bytes that are not UTF-8 (which Python keeps as
    the surrogates U+DC80..U+DCFF) as \\xNN and control characters escaped as repr() does."""
    text = os.fspath(path)
    if text.isprintable():
        return text
    return "'" + "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                         else repr(c)[1:-1] for c in text) + "'"


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` is not a regular file to read (a broken link, a link loop, a folder, a
    FIFO or device that would block or never end), or None when it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            return "it is a link to nothing"
        return e.strerror or one_line(e)
    if stat.S_ISDIR(mode):
        return "it is a folder"
    return None if stat.S_ISREG(mode) else "it is not a regular file"


def image_error(path: str | os.PathLike[str], error: Exception) -> str:
    """The one-line message for an image that `open_image` or `decode_image` refused."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        why = "not an image format Pillow reads"
    elif isinstance(error, OSError) and error.strerror:
        why = error.strerror
    else:
        why = one_line(error).rstrip(".")
    return f"cannot read image {show_path(path)}: {why}"


def find_idx(folder: Path, name: str) -> Path | None:
    """The IDX file `name`, raw or gzipped, in `folder` (raw preferred)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}  # QMNIST's labels: int32


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes or 32-bit integers (optionally .gz) into an array
    of its declared shape.
    Reads at most one byte more than the header declares, so a .gz that inflates without end
    cannot fill the memory."""
    shown = show_path(path)
    again = "delete it and download again"
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise CnnlabError(f"{shown} is not an IDX file (bad magic number); {again}")
            if head[2] not in _IDX_TYPES:
                raise CnnlabError(f"{shown} holds IDX type 0x{head[2]:02x}; only unsigned "
                                  "bytes (0x08) and 32-bit integers (0x0c) are supported")
            dtype = _IDX_TYPES[head[2]]
            raw_dims = f.read(4 * head[3])
            if len(raw_dims) < 4 * head[3]:
                raise CnnlabError(f"{shown} is truncated (header incomplete); {again}")
            dims = [int.from_bytes(raw_dims[i:i + 4], "big") for i in range(0, len(raw_dims), 4)]
            expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
            if expected > MAX_IDX_BYTES:
                raise CnnlabError(f"{shown} declares a {'x'.join(map(str, dims))} array, more "
                                  f"than {MAX_IDX_BYTES >> 30} GiB; {again}")
            data = _read_at_most(f, expected + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise CnnlabError(f"cannot read {shown}: {one_line(e)}; {again}") from None
    if len(data) < expected:
        raise CnnlabError(f"{shown} is truncated ({len(data)} bytes of data, its header says "
                          f"{expected}); {again}")
    if len(data) > expected:
        raise CnnlabError(f"{shown} is longer than its header says ({expected} bytes of "
                          f"data); {again}")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _read_at_most(f: BinaryIO, limit: int, chunk: int = 1 << 26) -> bytes:
    """Up to `limit` bytes from `f`, read in chunks: never more memory than the data."""
    parts = []
    while limit > 0 and (part := f.read(min(chunk, limit))):
        parts.append(part)
        limit -= len(part)
    return b"".join(parts)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a crafted file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(path: Path):
    """The plain data and numpy arrays a CIFAR python file holds (_SafeUnpickler)."""
    with path.open("rb") as f:
        return _SafeUnpickler(f, encoding="bytes").load()


def read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (a pickled dict with b'data' and b'labels')."""
    try:
        batch = safe_unpickle(path)
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except FileNotFoundError:
        raise CnnlabError(f"missing CIFAR batch {show_path(path)}") from None
    except Exception as e:  # a damaged pickle raises many types; all mean the same here
        raise CnnlabError(f"{show_path(path)} is not a valid CIFAR batch ({one_line(e)}); "
                          "delete it and download again") from None
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
            or not len(data) or not np.issubdtype(labels.dtype, np.integer)
            or labels.shape != (len(data),)):
        raise CnnlabError(f"{show_path(path)} has data {data.dtype} {data.shape} and labels "
                          f"{labels.dtype} {labels.shape}; expected uint8 (N, 3072) and N "
                          "integers, N > 0; delete it and download again")
    labels = labels.astype(np.int64)
    check_labels(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_split(folder: Path, names: tuple[str, ...], num_classes: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_cifar_batch(folder / n, num_classes) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CnnlabError(f"{show_path(path)} has labels outside 0..{num_classes - 1} "
                          f"(found {labels.min()}..{labels.max()}); delete it and download "
                          "again")


# ---------------------------------------------------------------- image folders

def folder_classes(root: Path) -> list[str]:
    """Class names of an image-folder dataset: the subfolders of train/, sorted. There must
    be at least two, each name printable text (it is the model's label for the class)."""
    train, test = root / "train", root / "test"
    if not train.is_dir() or not test.is_dir():
        raise CnnlabError(f"{show_path(root)} must hold train/ and test/ folders, each with one "
                          "subfolder of images per class")
    classes = _class_folders(train)
    if len(classes) < 2:
        found = (f"only one class folder ({show_path(classes[0])})" if classes
                 else "no class subfolders")
        raise CnnlabError(f"{show_path(train)} has {found}; a classification dataset needs at "
                          f"least two classes: put each class's images in "
                          f"{show_path(train)}/<class>/")
    unknown = [name for name in _class_folders(test) if name not in classes]
    if unknown:
        raise CnnlabError(f"{show_path(test)} has classes not in train/: "
                          f"{', '.join(map(show_path, unknown))}; add them to train/ or remove "
                          "them")
    return classes


def _class_folders(split_dir: Path) -> list[str]:
    """The names of the subfolders of `split_dir` (hidden ones aside), sorted; a link there
    that leads nowhere or a name that is not printable text is an error."""
    names = []
    for entry in _list(split_dir):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.exists():
            raise CnnlabError(f"class folder {show_path(entry)} cannot be opened "
                              f"({file_problem(entry)}); fix or remove the link")
        if not entry.is_dir():
            continue
        if not entry.name.isprintable():
            raise CnnlabError(f"class folder {show_path(entry)}: its name is not printable "
                              "UTF-8 text, and class names are the model's labels; rename it")
        names.append(entry.name)
    return names


def _list(folder: Path) -> list[Path]:
    """The entries of `folder`, sorted, or an error naming it."""
    return [folder / name for name in _names(folder)]


def _names(folder: Path) -> list[str]:
    """The names in `folder`, sorted, or an error naming it."""
    try:
        return sorted(os.listdir(folder))
    except OSError as e:
        raise CnnlabError(f"cannot list folder {show_path(folder)}: "
                          f"{e.strerror or one_line(e)}") from None


def folder_files(split_dir: Path, classes: list[str], *, require_all: bool
                 ) -> list[tuple[str, int]]:
    """(path, label) for every image file under split_dir/<class>/, in a stable order; the
    paths as strings (60,000 Path objects take a second to make). Anything named like an
    image counts, a folder or a broken link too: reading it fails and names it, as for any
    other unreadable image."""
    files = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            if require_all:
                raise CnnlabError(f"class folder {show_path(class_dir)} is missing")
            continue
        base = os.path.join(class_dir, "")
        found = [base + n for n in _names(class_dir)
                 if n.lower().endswith(_IMAGE_ENDINGS) and not n.startswith(".")]
        if not found and require_all:
            raise CnnlabError(f"class folder {show_path(class_dir)} has no images "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        files.extend((p, label) for p in found)
    if not files:
        raise CnnlabError(f"{show_path(split_dir)} has no images; put each class's images in "
                          f"{show_path(split_dir)}/<class>/")
    return files


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Pillow's lazy image of `path`, refusing anything but a regular file first (Pillow
    would block on a FIFO and read a device without end)."""
    from PIL import Image

    problem = file_problem(path)
    if problem:
        raise OSError(problem)
    return Image.open(path)


_GRAYSCALE = ("L", "1", "I;16")  # the Pillow modes a dataset of grayscale images has
_FIRST_PASS_PIXELS = 256 * 256  # images up to this size are decoded as they are first opened


def _first_look(path: str | os.PathLike[str], mode: str | None, crop: tuple[int, int] | None = None
                ) -> np.ndarray | tuple[str, tuple[int, int]] | str:
    """One opening of an image file: a small image decoded (as `mode`; None: "L" if it is
    grayscale, else "RGB"), or any image with `crop` (width, height: decode_image's); of a
    larger one only (mode, size) from its header (the size as decode_image turns it: EXIF
    orientations 5-8 swap width and height), so that an image of the wrong size is never
    decoded; or why it cannot be read."""
    try:
        with open_image(path) as im:
            width, height = _oriented_size(im)
            if width * height > _FIRST_PASS_PIXELS and crop is None:
                return im.mode, (width, height)
            own = mode or ("L" if im.mode in _GRAYSCALE else "RGB")
            return _pixels(im, own, crop, crop=crop is not None)
    except Exception as e:  # Pillow raises many types (a decompression bomb's is neither an
        return image_error(path, e)  # OSError nor a ValueError); all mean the same here


def _oriented_size(im) -> tuple[int, int]:
    """An open image's (width, height) as decode_image turns it: EXIF orientations 5-8 swap
    them."""
    width, height = im.size
    return (height, width) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (width, height)


def header_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """An image's (height, width) from its header alone, or None where it cannot be read."""
    try:
        with open_image(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # its error is said when it is decoded
        return None


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


def decode_image(path: str | Path, mode: str, size: tuple[int, int] | None = None, *,
                 crop: bool = False) -> np.ndarray:
    """An image file as uint8 (C, H, W), decoded as in training and prediction alike: turned
    as its EXIF orientation says, 16/32-bit grayscale scaled to 8 bits, a transparent
    background made white, converted to `mode` (Pillow's "L" or "RGB") and, with `size`
    (width, height), resized bilinearly - with `crop`, keeping its aspect ratio: scaled
    until it covers `size`, then cut to it about its centre (torchvision's Resize +
    CenterCrop). Pillow's errors pass through, and OSError for what is no regular file
    (`file_problem`)."""
    with open_image(path) as im:
        return _pixels(im, mode, size, crop=crop)


def _pixels(im, mode: str, size: tuple[int, int] | None = None, *, crop: bool = False
            ) -> np.ndarray:
    """decode_image's work on an open image."""
    from PIL import Image, ImageOps

    im.load()
    im = ImageOps.exif_transpose(im)
    im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    im = im.convert(mode)
    if size is not None and im.size != tuple(size):
        box = None
        if crop:  # the centred part of the image with the target's aspect ratio
            (w, h), (tw, th) = im.size, size
            scale = max(tw / w, th / h)
            cw, ch = min(w, tw / scale), min(h, th / scale)  # never past it by rounding
            box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        im = im.resize(tuple(size), Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode(path: str | os.PathLike[str], mode: str, size: tuple[int, int], crop: bool = False
            ) -> np.ndarray | str:
    try:
        return decode_image(path, mode, size, crop=crop)  # size: a lying header breaks nothing
    except Exception as e:  # Pillow raises many types for bad files; all mean the same here
        return image_error(path, e)


def read_folder_split(files: list[tuple[str | os.PathLike[str], int]], *, mode: str | None = None,
                      size: tuple[int, int] | None = None, skip_bad: bool = False,
                      crop: bool = False, progress: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image to uint8 (N, C, H, W), on all cores (worker processes: Python's
    share of decoding small images holds the GIL), opening each small image once.

    `mode` (Pillow's "L" or "RGB") and `size` (width, height) default to what the files
    show: "L" if every image is grayscale, and the most common size. An unreadable image or
    one of another size stops with an error naming them, or with `skip_bad` is reported on
    stderr and left out. With `crop` (and `size`) every image is resized and centre-cropped
    to `size` (decode_image). `progress` names the progress phase shown (counting images
    decoded, a chunk of them at a time), e.g. "decoding cifar10-jpeg/train"; None: none.
    Memory running out while decoding is one line."""
    try:
        return _read_folder_split(files, mode, size, skip_bad, crop, progress)
    except (MemoryError, BrokenProcessPool):  # a decoder process killed for memory
        where = os.path.dirname(os.path.dirname(files[0][0]))
        raise CnnlabError(f"ran out of memory decoding the images of {show_path(where)}; "
                          "pass a smaller --image-size, or free memory") from None


def _read_folder_split(files: list[tuple[str | os.PathLike[str], int]], mode: str | None,
                       size: tuple[int, int] | None, skip_bad: bool, crop: bool,
                       progress: str | None) -> tuple[np.ndarray, np.ndarray]:

    paths = [p for p, _ in files]
    with _pool(len(paths)) as pool, Phase(progress or "", len(paths), "images",
                                          enabled=progress is not None) as phase:
        # small images come back decoded (grayscale ones as "L" when `mode` is open), larger
        # ones as (mode, size) from their headers, unreadable ones as an error; an image
        # counts as done when it is decoded or known to be left out
        looks = _in_chunks(pool, functools.partial(_first_look_all, mode=mode,
                                                   crop=size if crop else None), paths,
                           lambda part: phase.update(sum(not isinstance(look, tuple)
                                                         for look in part)))
        shapes = {path: ((look.shape[2], look.shape[1]), len(look) == 1)
                  if isinstance(look, np.ndarray) else (look[1], look[0] in _GRAYSCALE)
                  for path, look in zip(paths, looks) if not isinstance(look, str)}
        if mode is None:
            mode = "L" if shapes and all(gray for _, gray in shapes.values()) else "RGB"
        if size is None and shapes:
            size = Counter(s for s, _ in shapes.values()).most_common(1)[0][0]
        problems = {path: look for path, look in zip(paths, looks) if isinstance(look, str)}
        other = [p for p in paths if p not in problems and shapes[p][0] != tuple(size)]
        if other and not skip_bad:
            width, height = shapes[other[0]][0]
            raise CnnlabError(
                f"{len(other)} of the {len(paths)} images are not {size[0]}x{size[1]}, the "
                f"dataset's size (e.g. {show_path(other[0])} is {width}x{height}); pass "
                f"--image-size {size[1]}x{size[0]} (or another HxW) to resize and centre-crop "
                "them all, or --skip-bad-files to leave them out")
        for path in other:
            width, height = shapes[path][0]
            problems[path] = (f"image {show_path(path)} is {width}x{height} but the "
                              f"dataset's images are {size[0]}x{size[1]}")
        later = [p for p, look in zip(paths, looks) if isinstance(look, tuple)
                 and p not in problems]  # large images of the right size: decoded now
        phase.update(sum(isinstance(look, tuple) for look in looks) - len(later))
        decoded = dict(zip(later, _in_chunks(pool, functools.partial(
            _decode_all, mode=mode, size=size), later, lambda part: phase.update(len(part)))))
    kept, failed = _decoded_images(files, looks, decoded, problems, mode)
    problems |= failed
    refuse_or_skip(problems, skip_bad)
    if not kept:
        raise CnnlabError(f"no readable images among the {len(files)} files in "
                          f"{show_path(os.path.dirname(os.path.dirname(files[0][0])))}")
    return (np.stack([a for a, _ in kept]),
            np.array([label for _, label in kept], dtype=np.int64))


def _decoded_images(files: list[tuple[str | os.PathLike[str], int]], looks: list,
                    decoded: dict, problems: dict, mode: str
                    ) -> tuple[list[tuple[np.ndarray, int]], dict]:
    """The (image, label) of each file that is not in `problems` and decoded (its pixels in
    `decoded`, else its first look), a grayscale one repeated to 3 channels when `mode` is
    "RGB"; and {path: error} of the files that failed to decode."""
    kept: list[tuple[np.ndarray, int]] = []
    failed: dict = {}
    for (path, label), look in zip(files, looks):
        arr = decoded.get(path, look)
        if path in problems or path in failed:
            continue
        if isinstance(arr, str):
            failed[path] = arr
            continue
        kept.append((np.repeat(arr, 3, axis=0) if mode == "RGB" and len(arr) == 1 else arr,
                     label))
    return kept, failed


def refuse_or_skip(problems: dict, skip_bad: bool) -> None:
    """Stop with an error naming the first of `problems` ({path: error}) and counting the
    others, or with `skip_bad` report each on stderr."""
    if problems and not skip_bad:
        first = next(iter(problems.values()))
        more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        raise CnnlabError(f"{first}{more}; fix or remove it, or pass --skip-bad-files")
    for message in problems.values():
        print(f"cnnlab: skipping: {message}", file=sys.stderr)


def _first_look_all(paths: list[Path], mode: str | None, crop: tuple[int, int] | None
                    ) -> list:
    return [_first_look(p, mode, crop) for p in paths]


def _decode_all(paths: list[Path], mode: str, size: tuple[int, int], crop: bool = False
                ) -> list:
    return [_decode(p, mode, size, crop) for p in paths]


def _header(path: str | os.PathLike[str]) -> tuple[str, tuple[int, int]] | str:
    """An image's mode and (width, height) as decode_image turns it, from its header alone,
    or why it cannot be read."""
    try:
        with open_image(path) as im:
            return im.mode, _oriented_size(im)
    except Exception as e:  # Pillow raises many types; all mean the same here
        return image_error(path, e)


def _headers(paths: list[Path]) -> list:
    return [_header(p) for p in paths]


def stream_folder_split(files: list[tuple[str | os.PathLike[str], int]], out: Path, *,
                        mode: str | None = None, size: tuple[int, int] | None = None,
                        skip_bad: bool = False, crop: bool = False,
                        progress: str | None = None) -> tuple[DiskArray, np.ndarray]:
    """read_folder_split for a split larger than memory: the images decoded straight into
    the .npy file `out` (uint8 (N, C, H, W)), a block at a time, so that memory holds one
    block whatever the split's size; returns it as a DiskArray (read, never mapped), and the
    labels. `mode` and `size` (width, height) where not given come from the images' headers
    (read first, without decoding): "L" if all are grayscale, and their one size - images of
    several sizes need `crop` (--image-size)."""
    paths = [p for p, _ in files]
    with _pool(len(paths)) as pool, Phase(progress or "", len(paths), "images",
                                          enabled=progress is not None) as phase:
        problems: dict = {}
        if mode is None or size is None:
            heads = dict(zip(paths, _in_chunks(pool, _headers, paths, lambda part: None)))
            problems = {p: h for p, h in heads.items() if isinstance(h, str)}
            good = [h for h in heads.values() if not isinstance(h, str)]
            mode = mode or ("L" if good and all(m in _GRAYSCALE for m, _ in good) else "RGB")
            sizes = Counter(s for _, s in good)
            if size is None and sizes:
                size = sizes.most_common(1)[0][0]
                if len(sizes) > 1:
                    raise CnnlabError(f"the images are of {len(sizes)} sizes (the most common "
                                      f"{size[0]}x{size[1]}); pass --image-size HxW to resize "
                                      "and centre-crop them all")
        refuse_or_skip(problems, skip_bad)
        if size is None:
            raise CnnlabError(f"no readable images among the {len(files)} files")
        shape = (len(files), 1 if mode == "L" else 3, size[1], size[0])
        labels, kept, failed = np.empty(len(files), np.int64), 0, {}
        # the images decoded at once: _BLOCK_BYTES of them, enough to keep every core busy
        block = max(4 * _cores(), min(_CHUNK_FILES * _cores(),
                                      _BLOCK_BYTES // math.prod(shape[1:])))
        with open(out, "wb") as f:
            start = write_header(f, shape)
            f.seek(start)
            for first in range(0, len(files), block):
                part = [(p, label) for p, label in files[first:first + block]
                        if p not in problems]
                phase.update(min(block, len(files) - first) - len(part))
                decoded = _in_chunks(pool, functools.partial(_decode_all, mode=mode, size=size,
                                                             crop=crop), [p for p, _ in part],
                                     lambda done: phase.update(len(done)))
                for (path, label), image in zip(part, decoded):
                    if isinstance(image, str):
                        failed[path] = image
                        continue
                    f.write(np.ascontiguousarray(image))
                    labels[kept] = label
                    kept += 1
                f.flush()  # on the disk: pages the kernel may drop, not dirty ones it must keep
                getattr(os, "fdatasync", os.fsync)(f.fileno())  # (macOS has no fdatasync)
            if kept < len(files):  # files left out: the header says the rows there are
                write_header(f, (kept, *shape[1:]), start)
        refuse_or_skip(failed, skip_bad)
    if not kept:
        raise CnnlabError(f"no readable images among the {len(files)} files")
    return DiskArray(out), labels[:kept]


_SMALL = 2000  # fewer files than this are read in this process: workers would cost more
_CHUNK_FILES = 500  # files a chunk of work at most (_in_chunks)
_BLOCK_BYTES = 64 << 20  # decoded images held at once while a split goes to the disk cache


@contextlib.contextmanager
def _pool(count: int):
    """Worker processes, one a core (new interpreters, not forks of this one, which may hold
    torch's threads), or None to read in this process."""
    if count < _SMALL or _cores() < 2:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=_cores(), mp_context=context) as pool:
        yield pool


def _cores() -> int:
    return os.cpu_count() or 1


def _in_chunks(pool, work, items: list, done: Callable[[list], None]) -> list:
    """`work(items)`, split into chunks (over the pool's workers, or here one after another),
    results in order; `done(results)` for each chunk's as they come in (progress, which a
    worker cannot show). Chunks of at most _CHUNK_FILES: a progress bar that moves, while a
    chunk's overhead stays small next to decoding its images."""
    step = max(1, min(_CHUNK_FILES, -(-len(items) // (4 * _cores())) if pool else len(items)))
    chunks = [items[i:i + step] for i in range(0, len(items), step)]
    results = []
    for part in pool.map(work, chunks) if pool else map(work, chunks):
        done(part)
        results.extend(part)
    return results
