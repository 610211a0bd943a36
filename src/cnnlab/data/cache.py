"""The decoded-once cache: uint8 arrays beside the data, or in a user cache directory when
the data directory is read-only. Entries are keyed by a fingerprint of the source files, so
a changed file is decoded again; writes are atomic, so a killed run leaves no half entry."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..files import atomic_write

CACHE_VERSION = 2  # 2: images decoded by readers.decode_image


def user_cache_dir() -> Path:
    base = os.environ.get("CNNLAB_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab"


def fingerprint(files: Iterable[Path], extra: str = "") -> str:
    """Hash of the files' paths, sizes and modification times (cheap, no content read)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{extra}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def cached(preferred_dir: Path, key: str, decode: Callable[[], tuple[np.ndarray, np.ndarray]]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Return (images, labels) from the cache entry `key`, decoding and storing on a miss."""
    folders = (preferred_dir, _fallback_dir(preferred_dir))
    for folder in folders:
        x_path, y_path = folder / f"{key}.x.npy", folder / f"{key}.y.npy"
        if x_path.is_file() and y_path.is_file():
            try:
                return np.load(x_path, allow_pickle=False), np.load(y_path, allow_pickle=False)
            except (OSError, ValueError):
                pass  # a damaged entry is rebuilt below
    x, y = decode()
    errors = []
    for folder in folders:  # beside the data if writable, else the user cache
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for suffix, array in (("y", y), ("x", x)):
                atomic_write(folder / f"{key}.{suffix}.npy",
                             lambda f, a=array: np.save(f, a, allow_pickle=False))
            break
        except OSError as e:
            errors.append(f"{folder}: {e.strerror or e}")
    else:
        print(f"cnnlab: note: decoded data not cached ({'; '.join(errors)})", file=sys.stderr)
    return x, y


def _fallback_dir(preferred: Path) -> Path:
    tag = hashlib.sha256(str(preferred.resolve()).encode()).hexdigest()[:12]
    return user_cache_dir() / f"{preferred.parent.name}-{tag}"

