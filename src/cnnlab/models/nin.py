"""Network in Network (Lin, Chen & Yan 2014): convolutions followed by 1x1 convolutions (the
"micro networks"), and no linear layer at all - the last block has one channel a class and
global average pooling turns it into the scores. This is the paper's CIFAR-10 network:
three blocks of 192/160/96, 192/192/192 and 192/192/classes channels, max- then
average-pooling between them with dropout."""

from __future__ import annotations

from torch import nn


def _block(in_channels: int, channels: tuple[int, int, int], kernel: int) -> list[nn.Module]:
    """A convolution of `kernel` and two 1x1 convolutions, each followed by a ReLU."""
    first, second, third = channels
    return [nn.Conv2d(in_channels, first, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
            nn.Conv2d(first, second, 1), nn.ReLU(inplace=True),
            nn.Conv2d(second, third, 1), nn.ReLU(inplace=True)]


def nin(in_channels: int = 3, num_classes: int = 10,
        image_size: tuple[int, int] | None = None) -> nn.Sequential:
    """966,986 parameters for 3-channel input and 10 classes. Any input of 4x4 or more (the
    two 3x3 stride-2 poolings, rounding up)."""
    return nn.Sequential(
        *_block(in_channels, (192, 160, 96), 5),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(0.5),
        *_block(96, (192, 192, 192), 5),
        nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(0.5),
        # the last 1x1 convolution gives the class scores: no ReLU after it
        *_block(192, (192, 192, num_classes), 3)[:-1],
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
