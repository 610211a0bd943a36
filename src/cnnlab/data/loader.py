"""The in-memory loader: the whole split lives on the training device as one uint8 tensor;
batches are drawn by shuffled index, augmented and normalised as whole batches there.
No worker processes, no per-sample Python, no PIL in the training loop."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class DeviceLoader:
    """Yields (images, labels) batches: float images normalised with mean/std, on `device`.

    `augment` is a subset of {"crop", "flip"}: random crop after zero padding of 4 pixels,
    and random horizontal flip, both drawn per image from `generator`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 shuffle: bool = False, augment: frozenset[str] = frozenset(),
                 generator: torch.Generator | None = None, normalize: bool = True,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.channels_last = channels_last
        self.dtype = dtype
        if not normalize:  # the report's ToTensor(): pixels / 255 only
            mean, std = (0.0,) * len(mean), (1.0,) * len(std)
        # x_norm = (x / 255 - mean) / std = x * scale + shift, one fused multiply-add.
        m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = (1 / (255 * s)).to(dtype)
        self.shift = (-m / s).to(dtype)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        else:
            order = None
        for start in range(0, n, self.batch_size):
            if order is None:
                x = self.images[start:start + self.batch_size]
                y = self.labels[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                x, y = self.images[idx], self.labels[idx]
            if "crop" in self.augment:
                x = random_crop(x, 4, self.generator)
            if "flip" in self.augment:
                x = random_flip(x, self.generator)
            yield self.normalize(x), y

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(self.shift, x.to(self.dtype), self.scale)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Per-image random crop of a zero-padded batch (N, C, H, W), same size out."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
    flat = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat).view(n, c, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a batch left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
