"""Pre-activation ResNet-18 (He et al. 2016, "Identity mappings in deep residual networks"):
each block is batch-norm, ReLU, convolution twice, and its shortcut adds the untouched input
- the signal passes from block to block through identities alone. The CIFAR stem (a 3x3
stride-1 convolution, no max-pool) as in models/resnet.py; a batch-norm and ReLU after the
last block, as the paper has, before the pooling and the classifier."""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        # a 1x1 projection where the shape changes; it takes the pre-activated input
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], in_channels: int = 3, num_classes: int = 10
                 ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, planes = [], 64
        for i, count in enumerate(blocks):
            width = 64 * 2**i
            strides = [1 if i == 0 else 2] + [1] * (count - 1)
            layer = []
            for stride in strides:
                layer.append(PreActBlock(planes, width, stride))
                planes = width
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def preact_resnet18(in_channels: int = 3, num_classes: int = 10,
                    image_size: tuple[int, int] | None = None) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), in_channels, num_classes)
