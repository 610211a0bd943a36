"""Writing files so that a killed process never leaves half of one, and names safe for files.

Every file cnnlab writes goes through `atomic_write`: the bytes go to a temporary file beside
the target, are flushed to the disk, and the temporary file is renamed over the target."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], None]
Content = bytes | memoryview | Writer


def user_cache_dir() -> Path:
    """cnnlab's folder in the user's cache: $CNNLAB_CACHE, else $XDG_CACHE_HOME/cnnlab, else
    ~/.cache/cnnlab."""
    base = os.environ.get("CNNLAB_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab"


def temp_file(path: Path) -> Path:
    """A new, empty file beside `path` (the same file system, so a rename over `path` is
    atomic) with the permissions a plain `open` would give it (0666 less the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_synced(path: Path, content: Content) -> None:
    """Write `content` (bytes, or a function writing to a binary file) into `path` and flush
    it to the disk."""
    with path.open("wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, content: Content) -> None:
    """Replace `path` by `content` (bytes, or a function writing to a binary file) in one step:
    readers see the old file or the new one, never a part. An OSError (a full disk, a folder
    that may not be written) names `path`, and the old file stays as it was."""
    path = Path(path)
    tmp = None
    try:
        tmp = temp_file(path)
        write_synced(tmp, content)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def atomic_link(source: str | Path, path: str | Path) -> bool:
    """Make `path` a second name of the file `source` in one step (readers see the old file or
    the new one), so that the same bytes are not written twice; False where the file system
    has no hard links. Every file cnnlab writes is replaced, never changed in place, so the
    two names stay the same bytes until one of them is replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return True


def remove_temp_files(folder: Path) -> None:
    """Delete what `atomic_write` left in `folder` when a process was killed mid-write."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def safe_name(text: str, fallback: str = "x") -> str:
    """`text` as a file name on any system: runs of other characters than letters, digits and
    `_ . , = + -` become `-`; `fallback` if nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "-", text).strip("-.") or fallback
