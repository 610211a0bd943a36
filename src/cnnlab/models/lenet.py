"""LeNet-5 as in the lab report: two 5x5 convolutions with pooling, three linear layers."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv(6, 5x5, pad 2) -> ReLU -> pool -> conv(16, 5x5) -> ReLU -> pool
    -> 120 -> 84 -> classes. 61,706 parameters for 1x28x28 input and 10 classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 image_size: tuple[int, int] = (28, 28), pool: str = "max") -> None:
        super().__init__()
        def block(conv: nn.Conv2d) -> list[nn.Module]:
            # max-pool then ReLU is the same function as ReLU then max-pool, with the same
            # gradients, but the ReLU runs on a quarter of the values (parameter names are
            # the same in both orders, so checkpoints do not care)
            if pool == "max":
                return [conv, nn.MaxPool2d(2, 2), nn.ReLU(inplace=True)]
            return [conv, nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]

        self.features = nn.Sequential(*block(nn.Conv2d(in_channels, 6, 5, padding=2)),
                                      *block(nn.Conv2d(6, 16, 5)))
        h, w = ((s // 2 - 4) // 2 for s in image_size)  # the spatial size after `features`
        if h < 1 or w < 1:  # name the layer where the images stop fitting
            half = [s // 2 for s in image_size]  # after the first pooling
            where = (f"at features.3 (Conv2d) the 6x{half[0]}x{half[1]} input is smaller "
                     "than its 5x5 kernel" if min(half) < 5 else
                     f"at features.5 (AvgPool2d) the 16x{half[0] - 4}x{half[1] - 4} input "
                     "is smaller than its 2x2 window")
            raise ValueError(f"LeNet-5 needs images of at least 12x12, got "
                             f"{image_size[0]}x{image_size[1]}: {where}; resize a folder's "
                             "images with --image-size 28x28 (or another HxW)")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
