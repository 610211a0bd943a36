"""The decoded-once cache: uint8 arrays beside the data, or in a user cache directory when
the data directory is read-only.

An entry is three files named by its key, which holds a fingerprint of the source files'
paths, sizes and modification times (so a changed source is decoded again): `KEY.x.npy`
(uint8 images, N x C x H x W), `KEY.y.npy` (int64 labels) and, written last, `KEY.json`
with the content digest of both arrays (blake2b over their dtypes, shapes and bytes) and the
images' per-channel mean and standard deviation (a folder dataset normalises by them). An
entry is used only when both arrays load, have those dtypes and matching lengths, its labels
name one of the dataset's classes and the digest matches; anything else gets a one-line note
on stderr and the data is decoded and stored again. Writes are atomic, so a killed run leaves
no half file (a missing `KEY.json` makes the entry incomplete, and so rebuilt).

What the digest guards against: every change of the arrays that does not also rewrite
`KEY.json` - a damaged disk, a copy cut short, random bytes of the same size, another dtype
or shape, labels edited out of range. What it does not: it is not a signature, so whoever
may write the cache folder can store other arrays with a matching digest. That folder is
inside the data folder, whose writers can as well change the source files (which no check of
the cache could notice), or the user's own cache directory; a keyed hash would need a secret
per user, which would stop users and machines from sharing a cache and add no protection
beyond that of the sources themselves. So point CNNLAB_CACHE only at a folder that others
cannot write to. Shapes, dtypes and the label range are checked apart from the digest, so
even a forged entry cannot crash training.

Checking costs one pass of blake2b over the arrays (about 0.65 GB/s a core), spread over
threads as hashlib releases the GIL: on an idle 2-core CPU about 0.06 s for MNIST (55 MB)
and 0.2-0.3 s for CIFAR-10 (185 MB), where loading the arrays takes 0.02 s and 0.08 s."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import one_line
from ..files import atomic_write, safe_name
from .readers import show_path

CACHE_VERSION = 4  # 2: images decoded by readers.decode_image; 3: content digest in KEY.json;
# 4: channel statistics in KEY.json, keys from the paths within the data folder
_CHUNK = 1 << 22  # bytes hashed per thread task


class Split(NamedTuple):
    """One split of a dataset: uint8 images (N, C, H, W), int64 labels (N,), the content
    digest of both (`content_digest`) and the images' channel statistics."""

    images: np.ndarray
    labels: np.ndarray
    digest: str
    mean: tuple[float, ...]   # channel_stats(images)
    std: tuple[float, ...]


def user_cache_dir() -> Path:
    base = os.environ.get("CNNLAB_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab"


def fingerprint(root: Path, files: Iterable[Path], extra: str = "") -> str:
    """Hash of the files' paths within `root` (however `root` is spelled: relative, absolute,
    through a link), sizes and modification times (cheap, no content read). A file that
    cannot be looked at (a broken link) counts by its error, for its reader to report."""
    prefix = os.path.join(os.fspath(root), "")
    parts = [f"v{CACHE_VERSION}:{extra}"]
    for p in files:
        path = os.fspath(p)
        try:
            st = os.stat(path)
            state = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError as e:
            state = f"error {e.errno}"
        inside = path[len(prefix):] if path.startswith(prefix) else os.path.abspath(path)
        parts.append(f"{inside}:{state};")
    h = hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """Hex blake2b digest (128 bits) of both arrays' dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for a in (images, labels):
            h.update(f"{a.dtype.str}{a.shape};".encode())
            data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            chunks = (data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK))
            for part in pool.map(_blake2b, chunks):
                h.update(part)
    return h.hexdigest()


def _blake2b(data: np.ndarray) -> bytes:
    return hashlib.blake2b(data).digest()


def cached(preferred_dir: Path, key: str, num_classes: int,
           decode: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Split:
    """The split stored as entry `key`, checked (see the module's notes); decoded with
    `decode` and stored when there is no such entry or it fails a check."""
    folders = (preferred_dir, _fallback_dir(preferred_dir))
    problems = []
    for folder in folders:
        entry = _read_entry(folder, key, num_classes)
        if isinstance(entry, Split):
            return entry
        if entry:
            problems.append(f"cached data {show_path(folder / key)} {entry}")
    for problem in problems:
        print(f"cnnlab: note: {problem}; decoding the data again", file=sys.stderr)
    x, y = decode()
    split = Split(x, y, content_digest(x, y), *channel_stats(x))
    _write_entry(folders, key, split)
    return split


def _read_entry(folder: Path, key: str, num_classes: int) -> Split | str | None:
    """The entry's split, or what is wrong with it, or None when there is none."""
    paths = [folder / f"{key}{suffix}" for suffix in (".json", ".x.npy", ".y.npy")]
    if not any(os.path.lexists(p) for p in paths):
        return None
    if not all(p.is_file() for p in paths):
        return "is incomplete"
    try:
        manifest = json.loads(paths[0].read_bytes())
        # memory-mapped: a header claiming a huge shape fails here instead of allocating
        # it, the shapes are checked before anything is read, and the images stay mapped -
        # read from the page cache as batches need them, so a split larger than RAM still
        # trains (copy-on-write: a tensor made from them may be written, the file never)
        x, y = (np.load(p, mmap_mode="c", allow_pickle=False) for p in paths[1:])
    except (OSError, ValueError) as e:
        return f"cannot be read ({one_line(e, 120)})"
    if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (len(x),):
        return (f"holds images {x.dtype} {x.shape} and labels {y.dtype} {y.shape}, not uint8 "
                "(N, C, H, W) and int64 (N,)")
    y = np.array(y)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        return f"has labels outside 0..{num_classes - 1}"
    digest = content_digest(x, y)
    if not isinstance(manifest, dict) or manifest.get("digest") != digest:
        return "does not match the content digest it was stored with"
    stats = [manifest.get("mean"), manifest.get("std")]
    if not all(isinstance(v, list) and len(v) == x.shape[1] and
               all(type(f) is float for f in v) for v in stats):
        return "has no channel statistics"
    return Split(x, y, digest, *map(tuple, stats))


def _write_entry(folders: Iterable[Path], key: str, split: Split) -> None:
    """Store `split` in the first folder that takes it (beside the data if writable, else
    the user cache), its digest last."""
    manifest = json.dumps({"digest": split.digest, "mean": split.mean,
                           "std": split.std}).encode()
    errors = []
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for suffix, array in (("y", split.labels), ("x", split.images)):
                atomic_write(folder / f"{key}.{suffix}.npy",
                             lambda f, a=array: np.save(f, a, allow_pickle=False))
            atomic_write(folder / f"{key}.json", manifest)
            return
        except OSError as e:
            errors.append(f"{show_path(folder)}: {e.strerror or one_line(e)}")
    print(f"cnnlab: note: decoded data not cached ({'; '.join(errors)})", file=sys.stderr)


def _fallback_dir(preferred: Path) -> Path:
    tag = hashlib.sha256(os.fsencode(preferred.resolve())).hexdigest()[:12]
    return user_cache_dir() / f"{safe_name(preferred.parent.name)}-{tag}"


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 images (N, C, H, W), as fractions of 255,
    to 4 decimals: from exact integer sums of the pixels and of their squares (which fit
    uint16), without torch and in a fraction of a second for CIFAR-10."""
    means, stds = [], []
    for c in range(x.shape[1]):
        channel = x[:, c]
        n = channel.size
        total = int(channel.sum(dtype=np.uint64))
        squares = int((channel.astype(np.uint16) ** 2).sum(dtype=np.uint64))
        variance = (squares - total * total / n) / max(n - 1, 1)
        means.append(round(total / n / 255, 4))
        stds.append(round(max(math.sqrt(max(variance, 0.0)) / 255, 1e-3), 4))
    return tuple(means), tuple(stds)
