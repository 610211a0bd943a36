"""Model registry: every model is built as create_model(name, in_channels=, num_classes=,
image_size=, **options); options left as None keep the model's own defaults.

The registry names each model's module and builder; the module (and torch) is imported when
a model is built, so that listing the names - the command line's help - stays instant."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import CnnlabError, unknown_choice

if TYPE_CHECKING:
    from torch import nn

# name -> (module, builder, the options it takes besides the data's shape): the options are
# written here rather than read off the builder, so that checking them imports no torch
_REGISTRY = {"lenet5": ("lenet", "LeNet5", ("pool",)), "resnet18": ("resnet", "resnet18", ()),
             "fastnet": ("fastnet", "fastnet", ())}
MODELS = tuple(_REGISTRY)  # the model names


def _entry(name: str) -> tuple[str, str, tuple[str, ...]]:
    """Model `name`'s registry entry, or an error naming the models there are."""
    if name not in _REGISTRY:
        raise CnnlabError(unknown_choice("model", name, MODELS))
    return _REGISTRY[name]


def builder(name: str) -> Callable[..., nn.Module]:
    """The function (or class) that builds model `name`."""
    module, attribute, _ = _entry(name)
    return getattr(importlib.import_module(f".{module}", __name__), attribute)


def options_of(name: str) -> tuple[str, ...]:
    """The options model `name` takes besides the data's shape (e.g. ("pool",))."""
    return _entry(name)[2]


def create_model(name: str, *, in_channels: int, num_classes: int,
                 image_size: tuple[int, int], **options) -> nn.Module:
    build = builder(name)
    options = {k: v for k, v in options.items() if v is not None}
    for key in options:
        if key not in options_of(name):
            raise CnnlabError(f"model {name} has no option '{key}'")
    try:
        return build(in_channels=in_channels, num_classes=num_classes,
                     image_size=tuple(image_size), **options)
    except ValueError as e:
        raise CnnlabError(f"cannot build {name}: {e}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
