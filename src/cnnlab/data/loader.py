"""The in-memory loader: the whole split lives on the training device as one uint8 tensor;
batches are drawn by shuffled index, augmented and normalised as whole batches there.
No worker processes, no per-sample Python, no PIL in the training loop. A split larger than
memory stays in its cache file (a DiskArray): each batch is read from it a few batches
ahead by a thread, so that reading the disk overlaps training."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .disk import DiskArray

READ_AHEAD = 4  # batches of a split on disk gathered ahead of the one training

def mean_std(mean: Sequence[float], std: Sequence[float], normalize: bool = True
             ) -> tuple[list[float], list[float]]:
    """The per-channel mean and std the model's input is normalised with: the dataset's, or
    0 and 1 without normalisation (the lab report's ToTensor(): pixels / 255 only)."""
    if not normalize:
        return [0.0] * len(mean), [1.0] * len(std)
    return [float(m) for m in mean], [float(s) for s in std]


def normalization(mean: Sequence[float], std: Sequence[float], normalize: bool = True,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32 of shape (1, C, 1, 1) on `device`, with
    x_norm = (x / 255 - mean) / std = x * scale + shift for uint8 pixels x: one fused
    multiply-add. Training, evaluation, prediction and export all normalise with these."""
    mean, std = mean_std(mean, std, normalize)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return 1 / (255 * s), -m / s


class Loader:
    """What every training and evaluation loader shares: the labels on the device, the epoch's
    length and sample order, each rank's slice of a global batch and the normalisation.
    Subclasses yield the batches: DeviceLoader from a split in memory (or on disk),
    photos.PhotoLoader from image files decoded each epoch."""

    def __init__(self, labels: torch.Tensor, *, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device, shuffle: bool = False,
                 generator: torch.Generator | None = None, normalize: bool = True,
                 channels_last: bool = False, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.generator = generator
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last  # every batch the same shape (a compiled step's need)
        self.scale, self.shift = normalization(mean, std, normalize, device)

    def __len__(self) -> int:
        return len(range(0, self._end(), self.batch_size))

    def _end(self) -> int:
        """Where the epoch ends: with `drop_last` (and more than a batch) before the last
        partial batch; with several ranks, a last training batch too small to give every
        rank a sample is dropped (an empty slice would make its loss NaN)."""
        n = len(self.labels)
        if self.drop_last and n > self.batch_size:
            return n - n % self.batch_size
        if self.shuffle and self.world_size > 1 and 0 < n % self.batch_size < self.world_size:
            return n - n % self.batch_size
        return n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.new_order())

    def new_order(self) -> torch.Tensor | None:
        """The sample order of the next epoch (None: in stored order). Every rank draws the
        same order from the same seeded generator."""
        if not self.shuffle:
            return None
        return torch.randperm(len(self.labels), device=self.device, generator=self.generator)

    def batches(self, order: torch.Tensor | None, start_batch: int = 0, epoch: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def own_part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (all of it with one process)."""
        return x if self.world_size == 1 else x.tensor_split(self.world_size)[self.rank]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # .to, not .contiguous: a one-channel batch must get NHWC
            x = x.to(memory_format=torch.channels_last)  # strides too, or oneDNN answers NCHW
        return torch.addcmul(self.shift, x.float(), self.scale)


class DeviceLoader(Loader):
    """Yields (images, labels) batches: float images normalised with mean/std, on `device`.

    `augment` is a subset of {"crop", "translate", "flip", "altflip"}, drawn per image from
    `generator`: a random crop after zero padding of 4 pixels, or a random translation by up
    to 2 pixels with a mirrored border; a random horizontal flip, or alternating flips (each
    image is mirrored in every other epoch, half of them in odd epochs and the rest in even
    ones, which halves the repeats of a view between consecutive epochs).
    """

    def __init__(self, images: torch.Tensor | DiskArray, labels: torch.Tensor, *,
                 augment: frozenset[str] = frozenset(), resident: bool | None = None,
                 on_disk: bool = False, **common) -> None:
        super().__init__(labels, **common)
        device = self.device
        # The split on the device when it fits there (half its free memory at most; on the
        # CPU it is there already, memory-mapped or not); else in pinned host memory, each
        # batch gathered there and copied over. `on_disk`: larger than memory - it stays in
        # its file (a DiskArray), each batch read ahead (`_host_batches`)
        self.on_disk = on_disk
        self.resident = resident if resident is not None else \
            not (on_disk and device.type == "cuda") and fits(images, device)
        self.images = images if on_disk else images.to(device) if self.resident else \
            _pinned(images, device)
        self.augment = augment
        # which images alternating flips mirror in odd epochs; the others in even ones
        self.odd_flips = (torch.rand(len(self.labels), device=device,
                                     generator=self.generator) < 0.5
                          if "altflip" in augment else None)

    def first_images(self, count: int) -> torch.Tensor:
        """The first `count` images of the split, uint8 on the device (a model's
        init_from_data)."""
        return torch.as_tensor(self.images[:count]).to(self.device)

    def batches(self, order: torch.Tensor | None, start_batch: int = 0, epoch: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch `epoch` in `order`, from batch `start_batch` on (to resume
        mid-epoch). With several ranks, each yields its own contiguous slice of every global
        batch."""
        n = self._end()
        starts = range(start_batch * self.batch_size, n, self.batch_size)
        host = None if self.resident and not self.on_disk else \
            self._host_batches(order, starts, n)
        for start in starts:
            stop = min(start + self.batch_size, n)
            idx = torch.arange(start, stop, device=self.device) if order is None \
                else order[start:stop]
            x = self.images[idx] if host is None else next(host)
            y = self.labels[idx]
            # Augment the whole global batch on every rank, then slice: the ranks' random
            # streams stay in step and their union is exactly the single-process batch.
            if "crop" in self.augment:
                x = random_crop(x, 4, self.generator)
            if "translate" in self.augment:
                x = random_crop(x, 2, self.generator, mirror=True)
            if "flip" in self.augment:
                x = random_flip(x, self.generator)
            if self.odd_flips is not None:
                x = flip_where(x, self.odd_flips[idx] == (epoch % 2 == 1))
            yield self.normalize(self.own_part(x)), self.own_part(y)

    def _host_batches(self, order: torch.Tensor | None, starts: range, n: int
                      ) -> Iterator[torch.Tensor]:
        """The uint8 images of each batch of a split not on the device, gathered on the
        host and copied over, the order's slice coming to the host once an epoch; from a
        split on disk, each gathered READ_AHEAD batches ahead in a thread (the order and so
        the result are the same)."""
        host_order = torch.arange(n) if order is None else order.cpu()

        def gather(start: int) -> torch.Tensor:
            return torch.as_tensor(self.images[host_order[start:min(start + self.batch_size,
                                                                    n)]])

        if not self.on_disk:
            for start in starts:
                yield gather(start).to(self.device, non_blocking=True)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = deque(pool.submit(gather, s) for s in starts[:READ_AHEAD])
            for i in range(len(starts)):
                batch = ahead.popleft().result()
                if i + READ_AHEAD < len(starts):
                    ahead.append(pool.submit(gather, starts[i + READ_AHEAD]))
                yield batch.to(self.device, non_blocking=True)


def fits(images: torch.Tensor, device: torch.device) -> bool:
    """Whether a split of `images` may live on `device`: always on the CPU; on a GPU if it
    takes at most half the device's free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= free // 2


def _pinned(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The split in page-locked host memory for fast copies to a GPU; as it is where that
    cannot be had (no GPU, or not enough lockable memory)."""
    if device.type != "cuda":
        return images
    try:
        return images.pin_memory()
    except RuntimeError:
        return images


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None, *,
                mirror: bool = False) -> torch.Tensor:
    """Per-image random crop (N, C, H, W) -> same size of the batch padded by `pad` pixels:
    zeros, or with `mirror` the image's own border reflected (no pixel repeated). Each image
    moves by dy, dx in [-pad, pad], drawn uniformly."""
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device, generator=generator)
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
    if mirror:  # index the image itself: -1 -> 1, h -> h - 2
        rows, cols, width, source = _reflect(rows - pad, h), _reflect(cols - pad, w), w, x
    else:
        width, source = w + 2 * pad, torch.nn.functional.pad(x, (pad, pad, pad, pad))
    flat = (rows * width + cols).view(n, 1, h * w).expand(n, c, h * w)
    return source.flatten(2).gather(2, flat).view(n, c, h, w)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back in, as reflect padding does (for a border
    narrower than the image)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a batch left-right with probability 1/2."""
    return flip_where(x, torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5)


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch with the images where `mask` (N,) is true mirrored left-right."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
