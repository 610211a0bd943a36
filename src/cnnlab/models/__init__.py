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
from . import code

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
    year: int = 0                 # of its paper
    options: Mapping[str, ModelOption] = field(default_factory=dict)
    cpu_bf16: bool = False        # precision "auto" on a CPU with native bf16 trains it in bf16
    # the parameter count others publish for the small-image form (10 classes), where it
    # is; `published` says where, and why ours differs where it does
    published_parameters: int | None = None
    published: str = ""
    imagenet_form: bool = False   # above family.SMALL pixels a side: torchvision's model

    @property
    def citation(self) -> str:
        """Its paper in short, as a table names it: "He et al. 2016"."""
        return f"{self.reference.split(',')[0]} {self.year}"


_CIFAR_REPO = "kuangliu/pytorch-cifar"  # the common CIFAR repository the counts are checked on
_HE = "He et al., Deep residual learning for image recognition"
_SIMONYAN = ("Simonyan & Zisserman, Very deep convolutional networks for large-scale image "
             "recognition (with batch-norm)")


def _family(name: str, title: str, reference: str, year: int, parameters: int,
            min_size: int, published_parameters: int | None = None,
            published: str = "") -> ModelEntry:
    """An entry of the classic family (family.py): small images in the CIFAR form, larger
    ones in torchvision's ImageNet form."""
    return ModelEntry(name, "family", name.replace("-", "_"), title, reference, (3, 32, 32),
                      parameters, min_size, year, cpu_bf16=True,
                      published_parameters=published_parameters, published=published,
                      imagenet_form=True)


_ENTRIES = (
    ModelEntry("lenet5", "lenet", "LeNet5",
               "LeNet-5: two 5x5 convolutions with pooling, three linear layers",
               "LeCun et al., Gradient-based learning applied to document recognition",
               (1, 28, 28), 61_706, 12, 1998,
               {"pool": ModelOption("max", ("max", "avg"), "the pooling after each convolution")},
               published_parameters=61_706, published="the lab report's LeNet-5"),
    _family("alexnet", "AlexNet: five convolutions, three large linear layers", "Krizhevsky "
            "et al., ImageNet classification with deep convolutional neural networks", 2012,
            23_468_874, 15),
    *(_family(f"vgg{depth}", f"VGG-{depth} with batch-norm", _SIMONYAN, 2015, count, 1,
              count, f"{_CIFAR_REPO} VGG('VGG{depth}'): the same")
      for depth, count in ((11, 9_231_114), (13, 9_416_010), (16, 14_728_266),
                           (19, 20_040_522))),
    ModelEntry("nin", "nin", "nin",
               "Network in Network: 1x1 convolutions, global average pooling for scores",
               "Lin et al., Network in network (the paper's CIFAR-10 network)",
               (3, 32, 32), 966_986, 4, 2014, cpu_bf16=True),
    _family("googlenet", "GoogLeNet: nine Inception blocks", "Szegedy et al., Going deeper "
            "with convolutions", 2015, 5_602_474, 2, 6_166_250,
            f"{_CIFAR_REPO} GoogLeNet: 6,166,250 - its Inception blocks take two 3x3 "
            "convolutions where torchvision's (built on here) take one, and its convolutions "
            "have biases"),
    ModelEntry("resnet18", "resnet", "resnet18",
               "ResNet-18 with the CIFAR stem (a 3x3 convolution, no max-pool)", _HE,
               (3, 32, 32), 11_173_962, 1, 2016, cpu_bf16=True,
               published_parameters=11_173_962, published=f"{_CIFAR_REPO} ResNet18: the same"),
    ModelEntry("preact-resnet18", "preact", "preact_resnet18",
               "pre-activation ResNet-18: batch-norm and ReLU before each convolution",
               "He et al., Identity mappings in deep residual networks", (3, 32, 32),
               11_172_170, 1, 2016, cpu_bf16=True, published_parameters=11_171_146,
               published=f"{_CIFAR_REPO} PreActResNet18: 11,171,146 - it has no batch-norm "
                         "after the last block, which the paper has (1,024 parameters)"),
    *(_family(f"resnet{depth}", f"ResNet-{depth}", _HE, 2016, count, 1, count,
              f"{_CIFAR_REPO} ResNet{depth}: the same")
      for depth, count in ((34, 21_282_122), (50, 23_520_842), (101, 42_512_970))),
    _family("densenet121", "DenseNet-121, growth rate 32", "Huang et al., Densely connected "
            "convolutional networks", 2017, 6_956_426, 8, 6_956_298,
            f"{_CIFAR_REPO} DenseNet121: 6,956,298 - torchvision's stem has a batch-norm "
            "(128 parameters) that it has not"),
    _family("mobilenetv2", "MobileNetV2: inverted residual blocks", "Sandler et al., "
            "MobileNetV2: inverted residuals and linear bottlenecks", 2018, 2_236_682, 1,
            2_296_922, f"{_CIFAR_REPO} MobileNetV2: 2,296,922 - it adds a 1x1 convolution "
            "shortcut to stride-1 blocks that change the width; the paper and torchvision "
            "have none"),
    ModelEntry("fastnet", "fastnet", "fastnet",
               "a compact CIFAR-10 network: a whitened 2x2 patch stem, three conv groups",
               "Jordan, airbench: the public CIFAR-10 speed records (their ideas)",
               (3, 32, 32), 1_972_792, 9, 2024, cpu_bf16=True),
)
REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}
MODELS = tuple(REGISTRY)  # the model names


def entry(name: str) -> ModelEntry:
    """Model `name`'s registry entry, or an error naming the models there are."""
    if name not in REGISTRY:
        raise CnnlabError(unknown_choice("model", name, MODELS))
    return REGISTRY[name]


SMALL = 64  # family.py's: the largest image side of its small-image form


def describe(name: str) -> dict[str, Any]:
    """Model `name`'s registry entry as plain data, as `cnnlab models` lists it."""
    e = entry(name)
    c, h, w = e.designed_for
    images = f"{e.min_size}x{e.min_size} and larger"
    if e.imagenet_form:
        images += f"; ImageNet form above {SMALL}x{SMALL}"
    return {"model": e.name, "title": e.title, "paper": e.reference, "year": e.year,
            "citation": e.citation,
            "parameters": e.parameters, "at": f"{c}x{h}x{w}", "images": images,
            "options": {k: {"default": o.default, "choices": list(o.choices), "help": o.help}
                        for k, o in e.options.items()},
            "published": e.published}


def builder(name: str) -> Callable[..., nn.Module]:
    """The function (or class) that builds registered model `name`."""
    found = entry(name)
    return getattr(importlib.import_module(f".{found.module}", __name__), found.builder)


def options_of(name: str) -> tuple[str, ...]:
    """The options model `name` takes besides the data's shape (e.g. ("pool",))."""
    return tuple(entry(name).options) if name in REGISTRY else ()


HUBS = ("torchvision", "timm")  # torchvision:NAME, timm:NAME


def hub_of(name: str) -> str | None:
    """"torchvision" or "timm" for a model named from one of them, else None."""
    prefix, colon, _ = name.partition(":")
    return prefix if colon and prefix in HUBS else None


def is_code(name: str) -> bool:
    """Whether model `name` is the user's own code: path/to/net.py:Net or module:build."""
    return ":" in name and hub_of(name) is None


def checked_name(name: str) -> str:
    """Model `name` as a run records it (a model file's path made absolute), or an error
    naming the models there are."""
    if is_code(name):
        return code.absolute(name)
    if hub_of(name):
        if not name.partition(":")[2]:
            raise CnnlabError(f"model {name!r}: name the model, e.g. torchvision:resnet50")
        return name
    entry(name)
    return name


def about(name: str) -> tuple[str, str]:
    """What model `name` is and where it comes from, in a few words each."""
    hub = hub_of(name)
    if hub:
        return f"{hub}'s {name.partition(':')[2]}", f"{hub}.models" if hub == "torchvision" \
            else "timm"
    if is_code(name):
        return f"your own model {label(name)}", name.rpartition(":")[0]
    found = entry(name)
    return found.title, found.reference


def label(name: str) -> str:
    """A model's name as tables and folder names show it (net.py:Net for a model file)."""
    if is_code(name):
        return code.label(name)
    return name


def create_model(name: str, *, in_channels: int, num_classes: int,
                 image_size: tuple[int, int], pretrained: bool = False,
                 found: Callable[..., nn.Module] | None = None, **options) -> nn.Module:
    """Model `name` for images of `in_channels` x `image_size` and `num_classes` classes:
    a registered one (its `options` the registry's), torchvision's or timm's (`options`
    their keyword arguments; `pretrained`: the published weights), or the user's own
    (`found`: its class or function, else loaded from `name`; `options` its arguments)."""
    if hub_of(name) or is_code(name):
        options = {k: v for k, v in options.items() if v is not None}
    if hub_of(name):
        from . import hub

        build = hub.torchvision_model if hub_of(name) == "torchvision" else hub.timm_model
        return build(name.partition(":")[2], in_channels=in_channels,
                     num_classes=num_classes, pretrained=pretrained, args=options)
    if is_code(name):
        found = found or code.load_new(name)[0]
        facts = {"in_channels": in_channels, "num_classes": num_classes,
                 "image_size": tuple(image_size)}
        return code.construct(found, name, facts, options)
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
