"""The classic CNN family, built from torchvision's own classes (nothing of them copied here)
in two forms:

- on small images (a side of at most SMALL pixels: MNIST's 28x28, CIFAR's 32x32) the form the
  CIFAR literature adapts them to: a 3x3 stride-1 stem instead of the large strided one, no
  early max-pool, a classifier sized for the dataset's classes;
- on larger images (`--image-size`), torchvision's ImageNet model exactly - the same modules,
  parameters and state-dict keys - with the first convolution taking the data's channels and
  the last layer its classes.

Every builder takes (in_channels, num_classes, image_size) as the registry's others do, and
re-initialises what it replaces as torchvision initialises the layer it stands for."""

from __future__ import annotations

import importlib

from torch import nn

from . import SMALL  # the largest image side the small-image form is for

# torchvision's model modules (torchvision.models' attributes of the same names are the
# builder functions)
_alexnet, _densenet, _googlenet, _mobilenet, _resnet, _vgg = (
    importlib.import_module(f"torchvision.models.{name}")
    for name in ("alexnet", "densenet", "googlenet", "mobilenetv2", "resnet", "vgg"))



def _small(image_size: tuple[int, int] | None) -> bool:
    return image_size is None or max(image_size) <= SMALL


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
          bias: bool = False) -> nn.Conv2d:
    """A convolution initialised as torchvision's CNNs initialise theirs (He, fan-out)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, num_classes: int) -> nn.Linear:
    """A classifier layer initialised as torchvision's VGG and AlexNet initialise theirs."""
    layer = nn.Linear(in_features, num_classes)
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


def _resnet_builder(block: type[nn.Module], layers: list[int]):
    def build(in_channels: int = 3, num_classes: int = 10,
              image_size: tuple[int, int] | None = None) -> _resnet.ResNet:
        model = _resnet.ResNet(block, layers, num_classes=num_classes)
        if _small(image_size):  # 3x3 stride-1 stem, no max-pool (He et al. 2016, section 4.2)
            model.conv1, model.maxpool = _conv(in_channels, 64, 3), nn.Identity()
        elif in_channels != 3:
            model.conv1 = _conv(in_channels, 64, 7, 2)
        return model
    return build


resnet34 = _resnet_builder(_resnet.BasicBlock, [3, 4, 6, 3])
resnet50 = _resnet_builder(_resnet.Bottleneck, [3, 4, 6, 3])
resnet101 = _resnet_builder(_resnet.Bottleneck, [3, 4, 23, 3])


def _vgg_builder(config: str):
    def build(in_channels: int = 3, num_classes: int = 10,
              image_size: tuple[int, int] | None = None) -> _vgg.VGG:
        model = _vgg.VGG(_vgg.make_layers(_vgg.cfgs[config], batch_norm=True),
                         num_classes=num_classes)
        if in_channels != 3:
            model.features[0] = _conv(in_channels, 64, 3, bias=True)
        if _small(image_size):
            # pooling rounds up, so that 28x28 comes down to 1x1 as 32x32 does; one linear
            # layer on the 512 features (the CIFAR VGG of Liu & Deng 2015 and its followers)
            for i, layer in enumerate(model.features):
                if isinstance(layer, nn.MaxPool2d):
                    model.features[i] = nn.MaxPool2d(2, 2, ceil_mode=True)
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = _linear(512, num_classes)
        return model
    return build


vgg11, vgg13, vgg16, vgg19 = (_vgg_builder(c) for c in ("A", "B", "D", "E"))


def densenet121(in_channels: int = 3, num_classes: int = 10,
                image_size: tuple[int, int] | None = None) -> _densenet.DenseNet:
    model = _densenet.DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)
    if _small(image_size):  # the CIFAR stem of Huang et al. 2017: one 3x3 convolution
        model.features.conv0, model.features.pool0 = _conv(in_channels, 64, 3), nn.Identity()
    elif in_channels != 3:
        model.features.conv0 = _conv(in_channels, 64, 7, 2)
    return model


# MobileNetV2's blocks (expansion, channels, repeats, stride); on small images the first
# convolution and the second stage keep the resolution (stride 1), as for CIFAR-10
_MOBILENET_SMALL = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                    [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def mobilenetv2(in_channels: int = 3, num_classes: int = 10,
                image_size: tuple[int, int] | None = None) -> _mobilenet.MobileNetV2:
    small = _small(image_size)
    model = _mobilenet.MobileNetV2(num_classes=num_classes,
                                   inverted_residual_setting=_MOBILENET_SMALL if small else None)
    if small or in_channels != 3:
        model.features[0][0] = _conv(in_channels, 32, 3, 1 if small else 2)
    return model


def googlenet(in_channels: int = 3, num_classes: int = 10,
              image_size: tuple[int, int] | None = None) -> nn.Module:
    """torchvision's GoogLeNet (its Inception blocks take a 3x3 convolution where the paper
    has 5x5; no auxiliary classifiers)."""
    model = _googlenet.GoogLeNet(num_classes=num_classes, aux_logits=False,
                                 transform_input=False, init_weights=True)
    if _small(image_size):  # the stem keeps the resolution: 3x3, no max-pools before 3a
        model.conv1 = _googlenet.BasicConv2d(in_channels, 64, kernel_size=3, padding=1)
        model.maxpool1 = model.maxpool2 = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _googlenet.BasicConv2d(in_channels, 64, kernel_size=7, stride=2,
                                             padding=3)
    return model


def alexnet(in_channels: int = 3, num_classes: int = 10,
            image_size: tuple[int, int] | None = None) -> _alexnet.AlexNet:
    model = _alexnet.AlexNet(num_classes=num_classes)
    if _small(image_size):
        # a 3x3 stride-1 first convolution; the three 3x3 stride-2 max-pools bring 32x32 to
        # 3x3 (28x28 to 2x2), pooled to 2x2 for the classifier's first layer
        model.features[0] = _conv(in_channels, 64, 3, bias=True)
        model.avgpool = nn.AdaptiveAvgPool2d(2)
        model.classifier[1] = nn.Linear(256 * 2 * 2, 4096)
    elif in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, 11, 4, 2)
    return model
