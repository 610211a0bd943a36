"""A split larger than memory, left in its .npy file: written a block at a time and read a
few rows at a time with plain reads, never memory-mapped whole - a process under an
address-space limit (`ulimit -v`) cannot map a file larger than the room the limit leaves,
and the pages a read brings in stay the kernel's page cache, which it may drop."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

_MAGIC = b"\x93NUMPY\x01\x00"  # .npy format version 1.0
_ALIGN = 64                     # the header's length, a multiple of this (numpy's own)


def write_header(f: BinaryIO, shape: tuple[int, ...], length: int | None = None) -> int:
    """Write the .npy header of a uint8 C-order array of `shape` at the start of `f`, padded
    to `length` bytes (default: its own length and a spare block, so that a header of fewer
    rows fits the same room later); returns its length, where the data begins."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    length = length or math.ceil((len(_MAGIC) + 2 + len(text) + 1) / _ALIGN + 1) * _ALIGN
    header = (text.ljust(length - len(_MAGIC) - 3) + "\n").encode("latin1")
    f.seek(0)
    f.write(_MAGIC + (len(header)).to_bytes(2, "little") + header)
    return length


class DiskArray:
    """A uint8 (N, C, H, W) array in a .npy file, its rows read when asked for: a slice or
    the rows of an index array, as a NumPy array. Not mapped, so its size counts against no
    memory limit; the file must stay (a cache entry, replaced only by a new name)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path, self._fd = Path(path), os.open(path, os.O_RDONLY)
        with os.fdopen(os.dup(self._fd), "rb") as f:  # the header of the file kept open
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"holds {dtype} {shape}{' in Fortran order' * fortran}, not "
                             "uint8 (N, C, H, W)")
        self.shape, self.dtype = tuple(shape), np.dtype(np.uint8)
        self.row = math.prod(shape[1:])
        if size != self.offset + shape[0] * self.row:
            raise ValueError(f"is {size} bytes, not the {self.offset + shape[0] * self.row} "
                             f"its header's shape {shape} needs")

    def __reduce__(self):  # to another process: its file opened there, by its path
        return DiskArray, (self.path,)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row

    def __getitem__(self, key) -> np.ndarray:
        """Rows `key`: a slice (step 1) in one read, or an index array (NumPy or torch), a
        read a row."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a DiskArray slice takes every row")
            out = np.empty((max(0, stop - start), *self.shape[1:]), np.uint8)
            self._read(out, start)
            return out
        rows = np.asarray(key).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for k, i in enumerate(rows.tolist()):
            self._read(out[k:k + 1], i if i >= 0 else i + len(self))
        return out

    def _read(self, out: np.ndarray, first: int) -> None:
        """Fill `out` with the rows from `first` on."""
        self._fill(memoryview(out).cast("B"), self.offset + first * self.row)

    def _fill(self, view: memoryview, position: int) -> None:
        """Fill `view` with the file's bytes from `position` on (os.preadv: straight into
        it, as often as a read comes back short)."""
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], position + done)
            if not got:
                raise OSError(f"{self.path} ended early")
            done += got

    def byte_chunks(self, size: int) -> Iterator[np.ndarray]:
        """The array's bytes in pieces of `size` (the last shorter), as its C-order buffer
        would be cut."""
        for start in range(0, self.nbytes, size):
            out = np.empty(min(size, self.nbytes - start), np.uint8)
            self._fill(memoryview(out), self.offset + start)
            yield out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
