"""Photos decoded each epoch: the training path for folders of full-resolution images trained
with random resized crops (`--augment resized-crop`), which no cache at one size can hold.

Each epoch DataLoader worker processes read the files of every batch, decode them
(torchvision's JPEG decoder, Pillow for other formats, as `readers.decode_image` turns
them), cut a random part of each (a uniform 8-100% of its area, its aspect ratio
log-uniform from 3/4 to 4/3), resize it to the training size with antialiasing and mirror
a random half. On a GPU the workers only read the files and nvJPEG decodes each batch of
JPEGs there.

Every random choice of an image comes from its own generator, seeded by (--seed, epoch,
index): the views depend on neither the number of workers nor which rank decodes them, a
resumed run cuts the very crops the uninterrupted one would have, and under torchrun each
rank decodes only its own slice of every global batch (its shard) while the union is the
one-process batch. (nvJPEG's pixels may differ from libjpeg's by a level here and there:
the crops are the same, the pixels bitwise only on one kind of decoder.)"""

from __future__ import annotations

import io
import math
import os
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CnnlabError, one_line
from .loader import Loader
from .readers import decode_image, file_problem, image_error, refuse_or_skip

SCALE = (0.08, 1.0)       # the part of an image's area a crop covers
RATIO = (3 / 4, 4 / 3)    # a crop's width / height
_JPEG = b"\xff\xd8\xff"   # how every JPEG file begins
_TRIES = 10               # crops drawn before the centred fallback


@dataclass(frozen=True)
class Photos:
    """A training split left as files: their paths (one bytes array: worker processes that
    touch a list of strings copy its pages), the size (H, W) and Pillow mode ("L" or "RGB")
    its views have, and a sample of it decoded once at that size - centre crops, whose
    statistics normalise the data and which a model's init_from_data sees."""

    paths: np.ndarray
    size: tuple[int, int]
    mode: str
    sample: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W), as the split's array would have."""
        return len(self.paths), 1 if self.mode == "L" else 3, *self.size

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])

    @classmethod
    def of(cls, paths: list, size: tuple[int, int], mode: str, sample: np.ndarray) -> Photos:
        return cls(np.array([os.fsencode(p) for p in paths]), size, mode, sample)


def crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random part of a `height` x `width` image: its area a uniform
    fraction in SCALE of the image's, its aspect ratio log-uniform in RATIO, drawn up to ten
    times until it fits; else the largest centred box whose ratio is within RATIO."""
    for _ in range(_TRIES):
        area = height * width * rng.uniform(*SCALE)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    ratio = min(max(width / height, RATIO[0]), RATIO[1])
    w, h = min(width, round(height * ratio)), min(height, round(width / ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def resized(image: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]
            ) -> torch.Tensor:
    """The `box` (top, left, h, w) of a uint8 (C, H, W) image resized to `size` (H, W),
    bilinear with antialiasing; uint8 on the image's device."""
    top, left, h, w = box
    part = image[None, :, top:top + h, left:left + w]
    if part.device.type != "cpu":  # uint8 interpolation is the CPU's alone
        part = part.float()
    out = F.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0] if out.dtype == torch.uint8 else out[0].round_().clamp_(0, 255).byte()


# EXIF orientations 2-8 as the flips and turns that put a (C, H, W) image upright
_UPRIGHT = {2: lambda x: x.flip(2), 3: lambda x: x.flip(1, 2), 4: lambda x: x.flip(1),
            5: lambda x: x.transpose(1, 2), 6: lambda x: x.transpose(1, 2).flip(2),
            7: lambda x: x.transpose(1, 2).flip(1, 2), 8: lambda x: x.transpose(1, 2).flip(1)}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded image turned as its EXIF orientation (1-8) says, as Pillow's exif_transpose
    turns it."""
    turn = _UPRIGHT.get(orientation)
    return image if turn is None else turn(image).contiguous()


def _orientation(data: bytes) -> int:
    """A JPEG's EXIF orientation, from its header; 1 where it has none."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged header: its decoder says so
        return 1


@dataclass(frozen=True)
class Views:
    """How a training view is cut from an image: a random resized crop to `size` (H, W)
    and, as `augment` asks, a mirror image - drawn from the generator of (seed, epoch,
    index) alone; with altflip, mirrored in odd or even epochs as a draw of (seed, 0, index)
    says."""

    seed: int
    augment: frozenset[str]
    size: tuple[int, int]

    def __call__(self, image: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        rng = np.random.default_rng((self.seed, epoch, index))
        out = resized(image, crop_box(rng, image.shape[1], image.shape[2]), self.size)
        if "flip" in self.augment and rng.random() < 0.5:
            out = out.flip(2)
        if "altflip" in self.augment and (  # "epoch 0" draws the image's parity
                np.random.default_rng((self.seed, 0, index)).random() < 0.5) == (epoch % 2 == 1):
            out = out.flip(2)
        return out


class _Jpeg(NamedTuple):
    """A JPEG file's bytes and EXIF orientation, as a worker that only reads hands it over
    (bytes, not a tensor: a tensor would cost the batch an open file a JPEG)."""

    data: bytes
    orientation: int


class _Files(torch.utils.data.Dataset):
    """What a DataLoader worker makes of a key (index, epoch): the image's view, or why its
    file cannot be read, with the index. With `raw` (decoding on the GPU) a JPEG comes back
    as a _Jpeg, any other image decoded whole (an array), and the main process cuts the
    view. It holds the paths, not the Photos: its sample stays with the main process."""

    def __init__(self, paths: np.ndarray, mode: str, view: Views, raw: bool) -> None:
        self.paths, self.mode, self.view, self.raw = paths, mode, view, raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path = os.fsdecode(self.paths[index])
        try:
            if problem := file_problem(path):  # a FIFO would block, a device never end
                raise OSError(problem)
            with open(path, "rb") as f:
                data = f.read()
            if self.raw and data.startswith(_JPEG):
                return _Jpeg(data, _orientation(data)), index
            image = decode(data, path, self.mode)
            return (image.numpy() if self.raw else self.view(image, index, epoch)), index
        except Exception as e:  # a bad file comes back as why: the main process decides
            return image_error(path, e), index


def _worker_start(_: int) -> None:
    """A DataLoader worker leaves the terminal's process group, and ignores SIGINT: Ctrl-C
    and a scheduler's SIGTERM to the group reach the training process alone, which
    checkpoints and then stops its workers (they also stop when it dies)."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode(data: bytes, path: str, mode: str) -> torch.Tensor:
    """An image file's bytes as uint8 (C, H, W) in `mode`, turned upright: a JPEG by
    torchvision's decoder, anything else (or a JPEG it refuses) as readers.decode_image
    decodes it."""
    if data.startswith(_JPEG):
        try:
            return decode_jpegs(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode,
                                apply_exif_orientation=True)
        except RuntimeError:  # e.g. a CMYK or 12-bit JPEG: Pillow knows more
            pass
    return torch.from_numpy(decode_image(path, mode).copy())  # Pillow's arrays are read-only


def decode_jpegs(data: torch.Tensor | list[torch.Tensor], mode: str, **options):
    """torchvision's decode_jpeg in Pillow's `mode` ("L" or "RGB"). Since 0.29 it warns
    that it is deprecated in favour of TorchCodec (which needs FFmpeg's libraries); it
    decodes as before."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB,
                           **options)


def _collate(items: list) -> tuple[torch.Tensor | list, list[int], list[tuple[str, int]]]:
    """A batch as a worker hands it over: the views stacked (with `raw`, the list of what
    is left to decode and cut), their images' indices, and (why, index) of each unreadable
    file."""
    good = [(what, i) for what, i in items if not isinstance(what, str)]
    views = [what for what, _ in good]
    if views and isinstance(views[0], torch.Tensor):
        views = torch.stack(views)
    return views, [i for _, i in good], [(what, i) for what, i in items if isinstance(what, str)]


class PhotoLoader(Loader):
    """Training batches of photos decoded each epoch (see the module's notes): the batches
    of `batches` come from `workers` DataLoader processes (0: decoded in this process), a
    few batches ahead; `skip_bad` leaves unreadable files out of their batch, each said
    once, instead of stopping. `on_device`: the JPEGs are decoded on the device in batches
    (nvJPEG: default on a GPU), the workers reading the files only."""

    def __init__(self, photos: Photos, labels: torch.Tensor, *, seed: int,
                 augment: frozenset[str], workers: int, skip_bad: bool = False,
                 on_device: bool | None = None, **common) -> None:
        super().__init__(labels, **common)
        self.photos, self.skip_bad, self.workers = photos, skip_bad, workers
        self.view = Views(seed, augment, photos.size)
        # the workers only read and decode_jpeg decodes on the device (default: a GPU's)
        self.on_device = self.device.type == "cuda" if on_device is None else on_device
        self._keys = _Keys()
        self._skipped: set[int] = set()
        self._stream: torch.cuda.Stream | None = None  # where nvJPEG's outputs are made
        self._loader = torch.utils.data.DataLoader(
            _Files(photos.paths, photos.mode, self.view, self.on_device),
            batch_sampler=self._keys, collate_fn=_collate, num_workers=workers,
            persistent_workers=workers > 0, worker_init_fn=_worker_start if workers else None)

    def first_images(self, count: int) -> torch.Tensor:
        """The first `count` images of the decoded sample, uint8 on the device."""
        return torch.from_numpy(self.photos.sample[:count]).to(self.device)

    def batches(self, order: torch.Tensor | None, start_batch: int = 0, epoch: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch `epoch` in `order` from batch `start_batch` on; this rank's slice
        of each, decoded by the workers while the ones before train."""
        n = self._end()
        order = torch.arange(n) if order is None else order.cpu()
        starts = range(start_batch * self.batch_size, n, self.batch_size)
        self._keys.count = len(starts)
        self._keys.batches = ([(i, epoch) for i in self.own_part(
            order[s:min(s + self.batch_size, n)]).tolist()] for s in starts)
        ready = iter(self._loader)
        while True:
            try:
                views, indices, bad = next(ready)
            except StopIteration:
                return
            except RuntimeError as e:  # a worker killed: for memory, or by a full /dev/shm
                if "DataLoader worker" not in str(e):
                    raise
                raise CnnlabError(f"a worker process decoding the photos stopped "
                                  f"({one_line(e, 160)}); pass fewer --workers, or give "
                                  "/dev/shm more room (docker run --shm-size)") from None
            if self.on_device:
                views, indices, unreadable = self._views_here(views, indices, epoch)
                bad += unreadable
            self._say_bad(bad, len(indices))
            if isinstance(views, list):
                views = torch.stack(views)
            y = self.labels[torch.tensor(indices, device=self.device)]
            yield self.normalize(views.to(self.device, non_blocking=True)), y

    def _say_bad(self, bad: list[tuple[str, int]], good: int) -> None:
        """Unreadable files of a batch refused in one line, or (skip_bad) each said once and
        left out, as the decoded-once splits do (readers.refuse_or_skip)."""
        if bad and self.skip_bad and not good:
            raise CnnlabError(f"{bad[0][0]}; no image of its batch is left: fix the files")
        refuse_or_skip({i: what for what, i in bad if i not in self._skipped}, self.skip_bad)
        self._skipped.update(i for _, i in bad)

    def _views_here(self, items: list, indices: list[int], epoch: int
                    ) -> tuple[list[torch.Tensor], list[int], list[tuple[str, int]]]:
        """The views of a batch the workers only read, and their indices: its JPEGs decoded
        together on the device (each one on the CPU where that refuses a batch: CMYK...),
        the other images as the workers decoded them, all cut here; (why, index) of a JPEG
        that no decoder reads."""
        jpegs = [k for k, what in enumerate(items) if isinstance(what, _Jpeg)]
        images = {k: torch.from_numpy(what).to(self.device) for k, what in enumerate(items)
                  if not isinstance(what, _Jpeg)}
        bad = []
        try:
            decoded = self._decode_here([items[k] for k in jpegs]) if jpegs else []
        except RuntimeError:
            decoded = [None] * len(jpegs)
        for k, image in zip(jpegs, decoded):
            if image is None:
                path = self.photos.path(indices[k])
                try:
                    image = decode(items[k].data, path, self.photos.mode).to(self.device)
                except Exception as e:  # Pillow raises many types; all mean the same here
                    bad.append((image_error(path, e), indices[k]))
                    continue
            images[k] = image
        kept = sorted(images)
        return ([self.view(images[k], indices[k], epoch) for k in kept],
                [indices[k] for k in kept], bad)

    def _decode_here(self, jpegs: list[_Jpeg]) -> list[torch.Tensor]:
        """JPEGs decoded together on the device and turned upright. On a GPU in a stream of
        their own, which the training's stream then waits for: nvJPEG decodes on a private
        stream that does not wait for the caller's, so outputs made on the training's stream
        could take memory that its queued kernels still read."""
        data = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
        if self.device.type != "cuda":
            decoded = decode_jpegs(data, self.photos.mode)
        else:
            self._stream = self._stream or torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._stream):
                decoded = decode_jpegs(data, self.photos.mode, device=self.device)
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            for image in decoded:
                image.record_stream(current)
        return [upright(image, j.orientation) for image, j in zip(decoded, jpegs)]


class _Keys:
    """The DataLoader's batch sampler: the keys of each batch of the epoch the loader set,
    made as the DataLoader asks for them (an epoch of ImageNet's would take 150 MB), from
    the iterator it takes each time it starts an epoch, its workers staying."""

    def __init__(self) -> None:
        self.batches: Iterator[list[tuple[int, int]]] = iter(())
        self.count = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.batches

    def __len__(self) -> int:
        return self.count


def default_workers(device: torch.device, threads: int) -> int:
    """DataLoader workers a process decodes with when --workers is not given: on a GPU all
    but one of its CPUs (16 at most: nvJPEG does the decoding); on the CPU half of them,
    beside the loop's threads (a worker keeps a core only while it decodes)."""
    if device.type == "cuda":
        return max(1, min(16, threads - 1))
    return max(1, threads // 2)
