"""Models by name from torchvision (`torchvision:resnet50`) and timm (`timm:convnext_nano`, an
optional extra imported only when asked), with their published weights on `--pretrained`.

A pretrained model keeps its published body; its classifier is replaced by a new one for
the dataset's classes and, for data with other than three channels, its first convolution by
one whose filters are the published ones summed over colour (one channel) or spread over
the channels - fine-tuning, as users of their own photo folders need it. torchvision's
weights come through torch.hub into torch's cache, their hash checked; an offline machine
gets one line saying where to put the file."""

from __future__ import annotations

import difflib
import urllib.error
from typing import Any

import torch
from torch import nn

from ..errors import CnnlabError, one_line

_IMAGENET_CLASSES = 1000
# torchvision models whose auxiliary classifiers make training return a tuple: left out
_NO_AUX = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def _close(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def torchvision_names() -> list[str]:
    """torchvision's classification models."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_count() -> int:
    """How many models timm names; 0 where it is not installed."""
    try:
        import timm
    except ImportError:
        return 0
    return len(timm.list_models())


def published_url(weights: Any) -> str:
    """Where torchvision publishes `weights` (its file name ends in the first digits of its
    SHA-256, which torch.hub checks)."""
    return weights.url


def _torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    import torchvision.models

    weights = torchvision.models.get_model_weights(name).DEFAULT
    url = published_url(weights)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True,
                                                  map_location="cpu", weights_only=True)
    except (urllib.error.URLError, OSError, ConnectionError) as e:
        file = url.rsplit("/", 1)[-1]
        raise CnnlabError(f"cannot download torchvision:{name}'s weights from {url} "
                          f"({one_line(getattr(e, 'reason', e), 120)}); on a machine without a "
                          f"network put {file} in {torch.hub.get_dir()}/checkpoints/") from None
    except RuntimeError as e:  # torch.hub's hash check
        raise CnnlabError(f"torchvision:{name}'s downloaded weights are damaged "
                          f"({one_line(e, 160)}); delete the file from "
                          f"{torch.hub.get_dir()}/checkpoints/ and try again") from None


def torchvision_model(name: str, *, in_channels: int, num_classes: int,
                      pretrained: bool = False, args: dict[str, Any] | None = None
                      ) -> nn.Module:
    import torchvision.models

    names = torchvision_names()
    if name not in names:
        raise CnnlabError(f"torchvision has no classification model {name!r}"
                          f"{_close(name, names)}; `cnnlab models --all` lists them")
    kwargs = {**_NO_AUX.get(name, {}), **(args or {})}
    try:
        model = torchvision.models.get_model(
            name, weights=None, num_classes=_IMAGENET_CLASSES if pretrained else num_classes,
            **kwargs)
    except (TypeError, ValueError) as e:
        raise CnnlabError(f"torchvision:{name}: {one_line(e, 200)}") from None
    if pretrained:
        state = _torchvision_weights(name)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("aux") for k in missing):
            raise CnnlabError(f"torchvision:{name}'s published weights do not fit the model "
                              f"built with {kwargs} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected)")
        replace_head(model, num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels, keep=pretrained)
    return model


def timm_model(name: str, *, in_channels: int, num_classes: int, pretrained: bool = False,
               args: dict[str, Any] | None = None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise CnnlabError(f"timm:{name} needs timm, which is not installed: pip install "
                          "'cnnlab[timm]'") from None
    names = timm.list_models()
    if name not in names and name.split(".")[0] not in names:
        raise CnnlabError(f"timm has no model {name!r}{_close(name, names)}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                 in_chans=in_channels, **(args or {}))
    except (OSError, ConnectionError) as e:  # huggingface_hub's offline errors are OSErrors
        raise CnnlabError(f"cannot download timm:{name}'s weights ({one_line(e, 160)}); on a "
                          "machine without a network copy the Hugging Face cache "
                          "(~/.cache/huggingface/hub) from one that has them, or set "
                          "HF_HUB_OFFLINE=1 with the files in place") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise CnnlabError(f"timm:{name}: {one_line(e, 200)}") from None


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def replace_head(model: nn.Module, num_classes: int) -> None:
    """The classifier (the last Linear, or 1x1 convolution, with 1000 outputs) made anew for
    `num_classes` classes, as torch initialises a new layer."""
    heads = [(n, m) for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == _IMAGENET_CLASSES)
             or (isinstance(m, nn.Conv2d) and m.out_channels == _IMAGENET_CLASSES)]
    if not heads:
        raise CnnlabError(f"cannot find {type(model).__name__}'s classifier (a layer with "
                          f"{_IMAGENET_CLASSES} outputs) to replace")
    path, old = heads[-1]
    if num_classes == _IMAGENET_CLASSES:
        return
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride,
                        old.padding, bias=old.bias is not None)
    _swap(model, path, new.to(old.weight.dtype))


def _replace_stem(model: nn.Module, in_channels: int, keep: bool) -> None:
    """The first convolution made to take `in_channels` channels; with `keep`, its filters
    the published ones summed over colour (one channel) or repeated and scaled."""
    path, old = next((n, m) for n, m in model.named_modules()
                     if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, bias=old.bias is not None)
    if keep:
        with torch.no_grad():
            if in_channels == 1:
                new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
            else:
                repeats = -(-in_channels // 3)
                new.weight.copy_(old.weight.repeat(1, repeats, 1, 1)[:, :in_channels]
                                 * (3 / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    _swap(model, path, new)
