"""ResNet-18 for small images (He et al. 2016, the CIFAR variant): a 3x3 stride-1 stem and
no max-pool, since the ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to
8x8 before the first block.

Its layers are named as torchvision's ResNet's (conv1, bn1, layer1-4, downsample, fc), so
that torchvision's resnet18 with this stem loads its weights as they are; checkpoints of the
earlier names (stem, layers.N, shortcut) load through `torchvision_names`."""

from __future__ import annotations

import re

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:  # 1x1 projection where the shape changes
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], in_channels: int = 3, num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes = width
        for i, n in enumerate(blocks):  # layer1 .. layer4
            planes, stage = width * 2 ** i, []
            for j in range(n):
                stage.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_names(state: dict, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> dict:
    """A state dict of the earlier names (stem.0/1, layers.K, shortcut.0/1) under today's,
    torchvision's; one of today's names is returned as it is."""
    if not any(k.startswith(("stem.", "layers.")) for k in state):
        return state
    starts = [sum(blocks[:i]) for i in range(len(blocks))]  # each stage's first block

    def renamed(key: str) -> str:
        key = re.sub(r"^stem\.0\.", "conv1.", key)
        key = re.sub(r"^stem\.1\.", "bn1.", key)
        found = re.match(r"^layers\.(\d+)\.(.*)$", key)
        if found:
            k = int(found[1])
            stage = max(i for i, start in enumerate(starts) if start <= k)
            key = f"layer{stage + 1}.{k - starts[stage]}.{found[2]}"
        return key.replace(".shortcut.", ".downsample.")

    return {renamed(k): v for k, v in state.items()}


def resnet18(in_channels: int = 3, num_classes: int = 10,
             image_size: tuple[int, int] | None = None) -> ResNet:
    """11,173,962 parameters for 3-channel input and 10 classes. Any input size works
    (global average pooling); `image_size` is accepted for a uniform interface."""
    return ResNet([2, 2, 2, 2], in_channels, num_classes)
