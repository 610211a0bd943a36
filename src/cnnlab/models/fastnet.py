"""fastnet: a compact CIFAR-10 network tuned for time-to-accuracy, after the airbench speed
records (Jordan 2024): a 2x2 patch stem, three conv groups (conv -> max-pool -> BN -> GELU ->
conv -> BN -> GELU) and a linear head on a global max-pool. Much of ResNet-18's accuracy at a
small fraction of its compute."""

from __future__ import annotations

import torch
from torch import nn


class ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(channels_out, momentum=0.4),
            nn.GELU(),
            nn.Conv2d(channels_out, channels_out, 3, padding="same", bias=False),
            nn.BatchNorm2d(channels_out, momentum=0.4),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class FastNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 image_size: tuple[int, int] | None = None,
                 widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        stem = 2 * in_channels * 4  # as airbench: twice the 2x2 patch dimension
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 2, bias=True), nn.GELU())
        self.groups = nn.Sequential(ConvGroup(stem, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        # A small output scale keeps early logits soft (airbench multiplies by 1/9).
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.groups(self.stem(x))).flatten(1)
        return self.head(x) * self.scale


def fastnet(in_channels: int = 3, num_classes: int = 10,
            image_size: tuple[int, int] | None = None) -> FastNet:
    return FastNet(in_channels, num_classes, image_size)
