"""The presets: the values a run takes for the options it was not given - `seed`, the lab
report's exact recipe, and `fast`, the shortest way to a good model - by model and dataset."""

from __future__ import annotations

from typing import Any

from .errors import CnnlabError, unknown_choice
from .models import hub_of, is_code
from .options import PRESETS

# The lab report's recipe (SEED.md): ToTensor only, batch 64, SGD momentum 0.9, constant lr.
_LAB_RECIPE = dict(batch_size=64, optimizer="sgd", momentum=0.9, nesterov=False,
                   weight_decay=0.0, schedule="constant", label_smoothing=0.0, augment="none",
                   normalize=False, norm_lr_scale=1.0, lookahead=False)
_LAB_LR_EPOCHS = {"mnist": (0.001, 64), "fashion-mnist": (0.001, 64), "cifar10": (0.01, 30)}

# The shortest way to a good model. LeNet-5 / MNIST: >= 98.8% after one epoch and >= 99.0%
# after two on a 2-core CPU (benchmarks/RESULTS.md). ResNet-18: a modern short GPU recipe.
# fastnet: the ideas of the public CIFAR-10 speed records (airbench, Jordan 2024) - batch 1024,
# Nesterov momentum 0.85, batch-norm biases at 64x the learning rate, weight decay 0.002 per
# step at the peak (lr x weight_decay), a triangular schedule, label smoothing 0.2, lookahead,
# translate + alternating flips, and flip + translate test-time averaging. The model
# initialises its first convolution by whitening the training images' 2x2 patches.
_FAST_RECIPE = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                    schedule="onecycle", normalize=True, norm_lr_scale=1.0, lookahead=False)
_FAST_BY_MODEL = {
    "lenet5": dict(epochs=1.5, batch_size=64, lr=0.1, label_smoothing=0.1),
    "resnet18": dict(epochs=20, batch_size=512, lr=0.2, label_smoothing=0.1),
    # no batch-norm: SGD at the family's rates leaves them at chance for hundreds of steps
    # (MNIST, 141 steps of 64: 11.35% at lr 0.2, 0.05, 0.01 and 0.003), Adam does not (81%
    # and 48%); benchmarks/RESULTS.md
    "alexnet": dict(epochs=20, batch_size=128, optimizer="adam", lr=1e-3, label_smoothing=0.1),
    "nin": dict(epochs=20, batch_size=128, optimizer="adam", lr=1e-3, label_smoothing=0.1),
    "fastnet": dict(epochs=10, batch_size=1024, lr=1.5, momentum=0.85, weight_decay=0.002 / 1.5,
                    schedule="triangle", label_smoothing=0.2, norm_lr_scale=64.0,
                    lookahead=True),
}
# Models that are not built in (your own, torchvision's, timm's): a plain starting recipe of
# the same kind, in smaller batches and a lower lr than the CIFAR ResNet-18's - not tuned for
# any one model: find a better lr with `cnnlab lr-find`.
_FAST_OTHER = dict(epochs=10, batch_size=128, lr=0.05, label_smoothing=0.1)


# What the fast preset augments natural images (CIFAR-10) with, by model.
_FAST_AUGMENT = {"fastnet": "translate,altflip"}
# The fast preset with --optimizer muon: Muon's lr and momentum for every model (chosen on
# fastnet), and what else changes for a model: fastnet trains 8 epochs; LeNet-5 takes the
# fastest trial's Muon lr and momentum of a search on MNIST (benchmarks/RESULTS.md, issue 25:
# 0.24 is far too high for it). The rest is the
# model's own fast preset (SGD's values for the norms, biases and the head). Config's own
# defaults of muon_lr and muon_momentum (the seed preset's, and what runs written before
# them read as) are kept apart: changing these leaves earlier runs' configs as they were.
_FAST_MUON = dict(muon_lr=0.24, muon_momentum=0.6)
_FAST_MUON_BY_MODEL = {"fastnet": dict(epochs=8),
                       "lenet5": dict(muon_lr=0.01, muon_momentum=0.89)}


def flips(augment: str) -> bool:
    """Whether an --augment value mirrors images."""
    return bool({"flip", "altflip"} & set(augment.split(",")))


def preset_values(preset: str, model: str, dataset: str,
                  optimizer: str | None = None) -> dict[str, Any]:
    """The values a preset gives for this model and dataset, trained with `optimizer` where
    the run chooses one (the fast preset has values of its own for muon): every field
    without a default but the model, the dataset, tta and data_dir (which `resolve`
    derives)."""
    if preset not in PRESETS:
        raise CnnlabError(unknown_choice("preset", preset, PRESETS))
    if preset == "seed":
        lr, epochs = _LAB_LR_EPOCHS.get(dataset, (0.01, 30))
        return dict(_LAB_RECIPE, lr=lr, epochs=epochs)
    # Crop+flip suits natural images; digits must not be mirrored, and folders opt in.
    augment = _FAST_AUGMENT.get(model, "crop,flip") if dataset == "cifar10" else "none"
    built_in = not (hub_of(model) or is_code(model))  # not your own, torchvision's or timm's
    recipe = _FAST_BY_MODEL.get(model, _FAST_BY_MODEL["resnet18"]) if built_in else _FAST_OTHER
    values = dict(_FAST_RECIPE, **recipe, augment=augment)
    if optimizer == "muon":
        values.update(_FAST_MUON, **_FAST_MUON_BY_MODEL.get(model, {}))
    return values


def fast_tta(augment: str) -> str:
    """The fast preset's test-time averaging for a model trained with `augment`."""
    if not flips(augment):
        return "none"
    return "flip,translate" if "translate" in augment.split(",") else "flip"
