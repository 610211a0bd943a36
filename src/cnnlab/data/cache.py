"""The decoded-once cache: uint8 arrays beside the data, or in the user's cache folder when
the data folder is read-only.

An entry is named by a *content* fingerprint of its sources (`content_key`: a hash of every
source file's bytes and path within the data folder, the dataset, the split and the decode
options), so a dataset copied or moved elsewhere - its files' times changed, in another
place, read-only or not - finds the entry it already has beside it, or in the user's cache
folder (`user_cache_dir`, the same for every data folder), instead of being decoded again.
Reading every file costs far less than decoding it (CIFAR-10's 60,000 JPEGs: about 0.6 s
of CPU against 13 s), yet a run that finds its data as it left it reads none: a *reference*
`NAME-STATE.ref` holds the content fingerprint, named by what `os.stat` says of the files
(`state_key`: the data folder's real path, each file's path within it, size, modification
and change times), and is written (where an entry would be) the first time the files are
seen as they are. No tool that rewrites a file can set its change time back, so a reference
found names the content of the files as they are; one missing or damaged costs a reading.

An entry is three files: `NAME-KEY.x.npy` (uint8 images, N x C x H x W), `NAME-KEY.y.npy`
(int64 labels) and, written last, `NAME-KEY.json` with the content digest of both arrays
(blake2b over their dtypes, shapes and bytes) and the images' per-channel mean and standard
deviation (a folder dataset normalises by them). An entry is used only when both arrays
load, have those dtypes and matching lengths, its labels name one of the dataset's classes
and the digest matches; anything else gets a one-line note on stderr and the data is decoded
and stored again. Writes are atomic, so a killed run leaves no half file (a missing
`NAME-KEY.json` makes the entry incomplete, and so rebuilt).

What the digest guards against: every change of the arrays that does not also rewrite
`NAME-KEY.json` - a damaged disk, a copy cut short, random bytes of the same size, another
dtype or shape, labels edited out of range. What it does not: it is not a signature, so
whoever may write the cache folder can store other arrays with a matching digest (or a
reference to another entry). That folder is inside the data folder, whose writers can as
well change the source files (which no check of the cache could notice), or the user's own
cache folder; a keyed hash would need a secret per user, which would stop users and
machines from sharing a cache and add no protection beyond that of the sources themselves.
So point CNNLAB_CACHE only at a folder that others cannot write to. Shapes, dtypes and the
label range are checked apart from the digest, so even a forged entry cannot crash training.

Checking costs one pass of blake2b over the arrays (about 0.65 GB/s a core), spread over
threads as hashlib releases the GIL: on an idle 2-core CPU about 0.06 s for MNIST (55 MB)
and 0.2-0.3 s for CIFAR-10 (185 MB), where loading the arrays takes 0.02 s and 0.08 s."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import CnnlabError, one_line
from ..files import Content, atomic_write, temp_file, user_cache_dir
from ..limits import size_text
from ..progress import Phase
from .disk import DiskArray
from .readers import show_path

CACHE_VERSION = 5  # 2: images decoded by readers.decode_image; 3: content digest in KEY.json;
# 4: channel statistics in KEY.json; 5: entries named by content, found through references
_CHUNK = 1 << 22  # bytes hashed per thread task, and read from a source file at a time
_KEY = re.compile(r"[0-9a-f]{32}")  # a content key, as a reference holds it

Sources = Sequence[str | os.PathLike[str]]


class Split(NamedTuple):
    """One split of a dataset: uint8 images (N, C, H, W), int64 labels (N,), the content
    digest of both (`content_digest`) and the images' channel statistics."""

    images: np.ndarray
    labels: np.ndarray
    digest: str
    mean: tuple[float, ...]   # channel_stats(images)
    std: tuple[float, ...]


def _within(root: str | os.PathLike[str]) -> Callable[[str | os.PathLike[str]], str]:
    """A file's path within `root`, however `root` is spelled (relative, absolute, through a
    link); the absolute path of one outside it."""
    prefix = os.path.join(os.fspath(root), "")
    return lambda p: (path[len(prefix):] if (path := os.fspath(p)).startswith(prefix)
                      else os.path.abspath(path))


def _hash(head: list[str], parts: Iterable[str]) -> str:
    """A 128-bit hex digest of `head` (as JSON, which ends where it ends) and the `parts`
    (each "path NUL what-is-known NUL": neither holds a NUL, so no two different inputs give
    the same bytes)."""
    text = json.dumps([CACHE_VERSION, *head]) + "".join(parts)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def state_key(root: Path, name: str, files: Sources, options: str = "") -> str:
    """What the files look like, without reading them: the data folder's real path, each
    file's path within it, size, modification and change times (a file that cannot be looked
    at counts by its error, for its reader to report), with the entry's name and options."""
    within, parts = _within(root), []
    for p in files:
        try:
            st = os.stat(p)
            seen = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        except OSError as e:
            seen = f"error {e.errno}"
        parts.append(f"{within(p)}\0{seen}\0")
    return _hash(["state", name, options, os.path.realpath(root)], parts)


def content_key(root: Path, name: str, files: Sources, options: str = "",
                phase: str | None = None) -> str:
    """The fingerprint an entry is named by: a hash of every file's path within `root` and
    its bytes (a file that is no regular file to read counts by why, for its reader to
    report), with the entry's name and options - the same wherever the folder lies. Shown
    as progress phase `phase` when given (reading a large folder from a slow disk)."""

    within, parts = _within(root), []
    with Phase(phase or "", len(files), "files", enabled=phase is not None) as progress:
        for p in files:
            parts.append(f"{within(p)}\0{_file_digest(p)}\0")
            progress.update()
    return _hash(["content", name, options], parts)


def _file_digest(path: str | os.PathLike[str]) -> str:
    """The blake2b digest of a regular file's bytes, or why it is none ("!..."): opened
    without waiting (a FIFO would block) and read only when it is a regular file (a device
    may never end). Plain os calls: for small images Python's file objects cost more than
    the hashing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return f"!error {e.errno}"
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return f"!mode {stat.S_IFMT(mode)}"
        h = hashlib.blake2b(digest_size=16)
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
        return h.hexdigest()
    except OSError as e:
        return f"!error {e.errno}"
    finally:
        os.close(fd)


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """Hex blake2b digest (128 bits) of both arrays' dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    threads = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for a in (images, labels):
            h.update(f"{a.dtype.str}{a.shape};".encode())
            if isinstance(a, DiskArray):  # read a chunk at a time (a few threads ahead)
                chunks = a.byte_chunks(_CHUNK)
            else:
                data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                chunks = iter([data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)])
            while window := list(itertools.islice(chunks, 2 * threads)):  # read a few at once
                for part in pool.map(_blake2b, window):
                    h.update(part)
    return h.hexdigest()


def _blake2b(data: np.ndarray) -> bytes:
    return hashlib.blake2b(data).digest()


def cached(root: Path, name: str, files: Sources, options: str, num_classes: int,
           decode: Callable[[], tuple[np.ndarray, np.ndarray]], *,
           phase: str | None = None, stream: Stream | None = None, size: int = 0) -> Split:
    """The split `name` (e.g. "mnist-train") of `files` under data folder `root`, decoded
    with `decode` and `options` (what else shapes the arrays), from the cache entry of their
    content when there is one that passes the checks (see the module's notes), else decoded
    and stored. `phase`: the progress shown while the files are read for their fingerprint.
    `stream` instead of `decode`, for a split larger than memory: stream(path) decodes the
    images straight into the .npy file `path` in the cache (`size` bytes of it), never
    holding them all, and returns them as a DiskArray (read, never mapped) with the
    labels."""
    folders, ref, key = _reference(root, name, files, options)
    known = key is not None
    key = key or content_key(root, name, files, options, phase)
    entry = f"{name}-{key}"
    problems = []
    for folder in folders:
        found = _read_entry(folder, entry, num_classes, on_disk=stream is not None)
        if isinstance(found, Split):
            if not known:  # the next run on these files finds the entry without reading them
                _store(folders, [(ref, key.encode())], "reference to the cached data not "
                       "written")
            return found
        if found:
            problems.append(f"cached data {show_path(folder / entry)} {found}")
    for problem in problems:
        print(f"cnnlab: note: {problem}; decoding the data again", file=sys.stderr)
    if stream is not None:
        return _streamed(folders, entry, (ref, key.encode()), stream, size)
    x, y = decode()
    split = Split(x, y, content_digest(x, y), *channel_stats(x))
    manifest = _manifest(split)
    _store(folders, [(f"{entry}.y.npy", lambda f: np.save(f, y, allow_pickle=False)),
                     (f"{entry}.x.npy", lambda f: np.save(f, x, allow_pickle=False)),
                     (f"{entry}.json", manifest), (ref, key.encode())],
           "decoded data not cached")
    return split


def _reference(root: Path, name: str, files: Sources, options: str
               ) -> tuple[tuple[Path, Path], str, str | None]:
    """The cache folders, the name of the reference for the files as they look now, and the
    content key it holds (None: none yet)."""
    folders = (root / ".cnnlab-cache", user_cache_dir())
    ref = f"{name}-{state_key(root, name, files, options)}.ref"
    return folders, ref, next(filter(None, (_read_ref(folder / ref) for folder in folders)),
                              None)


def fingerprint(root: Path, name: str, files: Sources, options: str,
                phase: str | None = None) -> str:
    """The content key of files that are never cached (photos decoded each epoch): from
    their reference when they are as a run last saw them, else read (shown as `phase`) and
    the reference written."""
    folders, ref, key = _reference(root, name, files, options)
    if key is None:
        key = content_key(root, name, files, options, phase)
        _store(folders, [(ref, key.encode())], "reference to the data's fingerprint not "
               "written")
    return key


Stream = Callable[[Path], tuple[DiskArray, np.ndarray]]
_DISK_RESERVE = 1 << 30  # bytes a streamed entry leaves free on its disk


def _manifest(split: Split) -> bytes:
    return json.dumps({"digest": split.digest, "mean": split.mean, "std": split.std}).encode()


def _streamed(folders: Iterable[Path], entry: str, ref: tuple[str, bytes], stream: Stream,
              size: int) -> Split:
    """A split decoded straight into a cache entry, in the first cache folder that may be
    written and has room for it; one line where none has."""
    errors = []
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as e:
            errors.append(f"{show_path(folder)}: {e.strerror or one_line(e)}")
            continue
        if free < size + _DISK_RESERVE:
            errors.append(f"{show_path(folder)} has {size_text(free)} free")
            continue
        images = folder / f"{entry}.x.npy"
        tmp = temp_file(images)
        try:
            x, y = stream(tmp)
            split = Split(x, y, content_digest(x, y), *channel_stats(x))
            os.replace(tmp, images)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        labels = io.BytesIO()
        np.save(labels, y, allow_pickle=False)
        for file, content in ((f"{entry}.y.npy", labels.getvalue()),
                              (f"{entry}.json", _manifest(split)), ref):
            atomic_write(folder / file, content)
        return split._replace(images=DiskArray(images))
    raise CnnlabError(f"the decoded images need {size_text(size)} of disk, and no cache folder "
                      f"has room ({'; '.join(errors)}); free some, or set CNNLAB_CACHE to a "
                      "folder with room")


def _read_ref(path: Path) -> str | None:
    """The content key a reference names; None when there is none or it holds no key (what
    is no regular file is not opened: a FIFO would block)."""
    try:
        if not path.is_file():
            return None
        with path.open("rb") as f:
            text = f.read(33).decode("ascii", "replace")  # a key and one more: none longer
    except OSError:
        return None
    return text if _KEY.fullmatch(text) else None


def _read_entry(folder: Path, key: str, num_classes: int, on_disk: bool = False
                ) -> Split | str | None:
    """The entry's split, or what is wrong with it, or None when there is none; `on_disk`:
    its images left in their file (a DiskArray)."""
    paths = [folder / f"{key}{suffix}" for suffix in (".json", ".x.npy", ".y.npy")]
    if not any(os.path.lexists(p) for p in paths):
        return None
    if not all(p.is_file() for p in paths):
        return "is incomplete"
    try:
        manifest = json.loads(paths[0].read_bytes())
        # memory-mapped, or (on_disk) read a few rows at a time: a header claiming a huge
        # shape fails here instead of allocating it, the shapes are checked before anything
        # is read, and the images are read from the page cache as batches need them
        # (copy-on-write: a tensor made from a mapping may be written, the file never)
        x = DiskArray(paths[1]) if on_disk else \
            np.load(paths[1], mmap_mode="c", allow_pickle=False)
        y = np.load(paths[2], mmap_mode="c", allow_pickle=False)
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


def _store(folders: Iterable[Path], files: list[tuple[str, Content]], failed: str) -> None:
    """Write `files` (name, content), each atomically and in order, into the first folder
    that takes them: beside the data if it is writable, else the user's cache folder; a
    note saying `failed` and why when none does."""
    errors = []
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for file, content in files:
                atomic_write(folder / file, content)
            return
        except OSError as e:
            errors.append(f"{show_path(folder)}: {e.strerror or one_line(e)}")
    print(f"cnnlab: note: {failed} ({'; '.join(errors)})", file=sys.stderr)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 images (N, C, H, W), as fractions of 255,
    to 4 decimals: from exact integer sums of the pixels and of their squares (which fit
    uint16), without torch and in a fraction of a second for CIFAR-10."""
    channels, pixels = x.shape[1], math.prod(x.shape[2:])
    totals, squares = [0] * channels, [0] * channels
    block = max(1, (1 << 24) // max(1, channels * pixels))  # images a pass: 16 MiB
    for i in range(0, len(x), block):  # a split larger than memory: a block at a time
        rows = x[i:i + block]
        for c in range(channels):
            totals[c] += int(rows[:, c].sum(dtype=np.uint64))
            squares[c] += int((rows[:, c].astype(np.uint16) ** 2).sum(dtype=np.uint64))
    n = len(x) * pixels
    means, stds = [], []
    for total, square in zip(totals, squares):
        variance = (square - total * total / n) / max(n - 1, 1)
        means.append(round(total / n / 255, 4))
        stds.append(round(max(math.sqrt(max(variance, 0.0)) / 255, 1e-3), 4))
    return tuple(means), tuple(stds)
