"""Model registry: every model is built as create_model(name, in_channels=, num_classes=,
image_size=, **options); options left as None keep the model's own defaults.

The registry is data: each entry names its module and builder, the options it takes (with
their defaults and choices), where it comes from, the input it was designed for with its
parameter count there, and the smallest images it takes. The command line's help, the
option checks, `cnnlab summary` and the report read it; the module (and torch) is imported
only when a model is built, so that reading the registry stays instant. A test checks the
entries against the builders."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CnnlabError, unknown_choice

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelOption:
    """An option a model takes besides the data's shape (`--pool` for LeNet-5)."""

    default: Any
    choices: tuple[str, ...]
    help: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    module: str                   # cnnlab.models.<module>
    builder: str                  # the function or class in it that builds the model
    title: str                    # what it is, in a few words
    reference: str                # where it comes from
    designed_for: tuple[int, int, int]  # the input (C, H, W) it was designed for
    parameters: int               # at that input, for 10 classes
    min_size: int                 # the smallest image side it takes
    options: Mapping[str, ModelOption] = field(default_factory=dict)
    cpu_bf16: bool = False        # precision "auto" on a CPU with native bf16 trains it in bf16


_ENTRIES = (
    ModelEntry("lenet5", "lenet", "LeNet5",
               "LeNet-5: two 5x5 convolutions with pooling, three linear layers",
               "LeCun et al. 1998, Gradient-based learning applied to document recognition",
               (1, 28, 28), 61_706, 12,
               {"pool": ModelOption("max", ("max", "avg"), "the pooling after each convolution")}),
    ModelEntry("resnet18", "resnet", "resnet18",
               "ResNet-18 with the CIFAR stem (a 3x3 convolution, no max-pool)",
               "He et al. 2016, Deep residual learning for image recognition",
               (3, 32, 32), 11_173_962, 1, cpu_bf16=True),
    ModelEntry("fastnet", "fastnet", "fastnet",
               "a compact network for CIFAR-10's time-to-accuracy: a whitened 2x2 patch stem, "
               "three conv groups",
               "after the public CIFAR-10 speed records (airbench, Jordan 2024)",
               (3, 32, 32), 1_972_792, 9, cpu_bf16=True),
)
REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}
MODELS = tuple(REGISTRY)  # the model names


def entry(name: str) -> ModelEntry:
    """Model `name`'s registry entry, or an error naming the models there are."""
    if name not in REGISTRY:
        raise CnnlabError(unknown_choice("model", name, MODELS))
    return REGISTRY[name]


def builder(name: str) -> Callable[..., nn.Module]:
    """The function (or class) that builds model `name`."""
    found = entry(name)
    return getattr(importlib.import_module(f".{found.module}", __name__), found.builder)


def options_of(name: str) -> tuple[str, ...]:
    """The options model `name` takes besides the data's shape (e.g. ("pool",))."""
    return tuple(entry(name).options)


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
