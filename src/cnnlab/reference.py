"""The reference pipeline cnnlab is measured against: the lab report's way, as in
pytorch/examples - a torchvision dataset with ToTensor(), a DataLoader, fp32, channels-first,
eager PyTorch. Kept deliberately plain: this is the baseline, not something to optimise.

`cnnlab bench` calls it in its own process, and times it as a whole process with
`python -m cnnlab.reference lenet-epoch DATA_DIR` (which prints its figures as JSON)."""

from __future__ import annotations

import time

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from cnnlab.models import create_model


def _loop(model: nn.Module, loader: DataLoader, lr: float, max_steps: int | None,
          warmup: int = 0) -> tuple[float, int]:
    """Train with SGD momentum 0.9; return (seconds, images) over the timed steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    images, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == warmup:
            start = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            images += len(y)
        if max_steps is not None and step + 1 >= warmup + max_steps:
            break
    loss.item()
    return time.perf_counter() - start, images


def lenet_mnist_epoch(data_dir: str, seed: int = 0) -> dict:
    """One epoch of the report's MNIST recipe: batch 64, SGD lr 0.001, momentum 0.9."""
    torch.manual_seed(seed)
    dataset = torchvision.datasets.MNIST(data_dir, train=True, download=False,
                                         transform=torchvision.transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=(28, 28))
    seconds, images = _loop(model, loader, lr=0.001, max_steps=None)
    return {"seconds": seconds, "images": images}


def resnet18_throughput(image_folder: str, steps: int = 4, batch_size: int = 128,
                        seed: int = 0) -> dict:
    """ResNet-18 training steps on CIFAR-10 images from an ImageFolder, fp32."""
    torch.manual_seed(seed)
    dataset = torchvision.datasets.ImageFolder(image_folder,
                                               transform=torchvision.transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    model = create_model("resnet18", in_channels=3, num_classes=10, image_size=(32, 32))
    seconds, images = _loop(model, loader, lr=0.01, max_steps=steps, warmup=1)
    return {"seconds": seconds, "images": images, "images_per_second": images / seconds}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m cnnlab.reference",
                                     description="Run the reference pipeline on its own.")
    parser.add_argument("pipeline", choices=("lenet-epoch",),
                        help="lenet-epoch: one epoch of the report's LeNet-5/MNIST recipe")
    parser.add_argument("data_dir", help="data root holding MNIST/raw/ (torchvision's layout)")
    args = parser.parse_args()
    print(json.dumps(lenet_mnist_epoch(args.data_dir)))
