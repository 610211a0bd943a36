"""Model registry: every model is built as create_model(name, in_channels=, num_classes=,
image_size=, **options); options left as None keep the model's own defaults."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ..errors import CnnlabError
from .fastnet import fastnet
from .lenet import LeNet5
from .resnet import resnet18

MODELS: dict[str, Callable[..., nn.Module]] = {"lenet5": LeNet5, "resnet18": resnet18,
                                               "fastnet": fastnet}


def create_model(name: str, *, in_channels: int, num_classes: int,
                 image_size: tuple[int, int], **options) -> nn.Module:
    builder = MODELS.get(name)
    if builder is None:
        raise CnnlabError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(builder).parameters
    for key in options:
        if key not in accepted:
            raise CnnlabError(f"model {name} has no option '{key}'")
    try:
        return builder(in_channels=in_channels, num_classes=num_classes,
                       image_size=tuple(image_size), **options)
    except ValueError as e:
        raise CnnlabError(f"cannot build {name}: {e}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
