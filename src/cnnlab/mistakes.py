"""The model's mistakes, as pictures: the test images it gets most confidently wrong
(top_losses.png, as fastai's plot_top_losses), which pixels of a few of them weigh most in
the wrong prediction (saliency.png) and the pairs of classes it confuses most (confused.png).

Everything comes from the logits one evaluation scored (inference.evaluate_checkpoint, with
its test-time averaging), and images are drawn as the model saw them: at its input size, the
normalisation undone. The saliency is Captum's Integrated Gradients of the predicted class: a
map at the image's own resolution, the same for every architecture (Grad-CAM needs each
model's last convolution named, and its map is as coarse as that layer's output: 10x10 for
LeNet-5 on MNIST, 4x4 for ResNet-18 on CIFAR-10), whose attributions add up to the change of
that class's logit from the baseline."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import ModelMeta
from .engine import logits
from .plots import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SHOWN = 9         # the top losses a report shows
PAIRS = 5         # the most confused pairs of classes
EXAMPLES = 4      # images of each pair
SALIENCY = 4      # top losses with a saliency map
STEPS = 32        # Integrated Gradients' steps from the baseline to the image
FIGURES = ("top_losses", "saliency", "confused")


@dataclass
class Mistakes:
    """What `find_mistakes` found. `pairs` and `top_losses` are plain data (class names,
    indices into the evaluated split); `pixels` holds each image they show as drawn
    (H, W, C floats in [0, 1]) and `saliency` the maps (H, W, in [0, 1]) of the first top
    losses, by index. `files`: the pictures, once drawn."""

    pairs: list[dict]       # {"true", "pred", "count", "examples": [index, ...]}
    top_losses: list[dict]  # {"index", "true", "pred", "prob", "loss"}, loss descending
    pixels: dict[int, np.ndarray]
    saliency: dict[int, np.ndarray]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What an eval JSON lists of the mistakes."""
        return {"pairs": self.pairs, "top_losses": self.top_losses,
                "saliency": list(self.saliency), "files": self.files}

    def draw(self, out_dir: str | Path, *, prefix: str = "", suffix: str = ""
             ) -> dict[str, Path]:
        """Write <prefix>top_losses<suffix>.png, saliency and confused into `out_dir` (none
        where the model made no mistake). Returns their paths by FIGURES' names."""
        if not self.top_losses:
            return {}
        paths = {name: Path(out_dir) / f"{prefix}{name}{suffix}.png" for name in FIGURES}
        plot_top_losses(self, paths["top_losses"])
        plot_saliency(self, paths["saliency"])
        plot_confused(self, paths["confused"])
        self.files = {name: str(path) for name, path in paths.items()}
        return paths


def find_mistakes(model: nn.Module, meta: ModelMeta, images: np.ndarray, labels: np.ndarray,
                  scores: torch.Tensor, *, shown: int,
                  prepare: Callable[[torch.Tensor], torch.Tensor], tta: str | None = None,
                  saliency: int = SALIENCY) -> Mistakes:
    """The `shown` images of the split (uint8 `images`, `labels`) with the highest loss among
    those the logits `scores` (as evaluated, with test-time averaging `tta`) get wrong; the
    PAIRS most confused (true, predicted) classes, each with its EXAMPLES highest-loss images;
    and the saliency of the first `saliency` top losses. `prepare`: uint8 images -> the
    model's input (inference.preprocess)."""
    device = next(model.parameters()).device
    labels = torch.from_numpy(labels).long()
    pred = scores.argmax(1)
    loss = F.cross_entropy(scores, labels, reduction="none")
    prob = scores.softmax(1).gather(1, pred[:, None])[:, 0]
    wrong = (pred != labels).nonzero()[:, 0]
    order = wrong[loss[wrong].argsort(descending=True, stable=True)]  # the worst first
    classes = meta.classes
    top = [{"index": i, "true": classes[labels[i]], "pred": classes[pred[i]],
            "prob": prob[i].item(), "loss": loss[i].item()} for i in order[:shown].tolist()]
    pairs = confused_pairs(labels[order], pred[order], order, classes)
    shows = sorted({t["index"] for t in top} | {i for p in pairs for i in p["examples"]})
    inputs = prepare(torch.from_numpy(images[shows]).to(device))
    mapped = [t["index"] for t in top[:saliency]]
    maps = saliency_maps(model, inputs[[shows.index(i) for i in mapped]],
                         pred[mapped].to(device), tta) if mapped else []
    return Mistakes(pairs, top, dict(zip(shows, to_pixels(inputs, meta))),
                    dict(zip(mapped, maps)))


def confused_pairs(true: torch.Tensor, pred: torch.Tensor, index: torch.Tensor,
                   classes: tuple[str, ...] | list[str]) -> list[dict]:
    """The PAIRS (true, predicted) classes of the most wrong predictions (the confusion
    matrix's largest cells off its diagonal), each with its count and the first EXAMPLES
    `index` of its images (in the order given: wrong predictions only)."""
    n = len(classes)
    counts = torch.bincount(true * n + pred, minlength=n * n)
    pairs = []
    for cell in counts.argsort(descending=True, stable=True)[:PAIRS].tolist():
        if not counts[cell]:
            break
        t, p = divmod(cell, n)
        examples = index[(true == t) & (pred == p)][:EXAMPLES].tolist()
        pairs.append({"true": classes[t], "pred": classes[p], "count": int(counts[cell]),
                      "examples": examples})
    return pairs


def to_pixels(x: torch.Tensor, meta: ModelMeta) -> np.ndarray:
    """The model's input `x` (N, C, H, W) as images: (N, H, W, C) floats in [0, 1], the
    normalisation undone (x * std + mean; without normalisation x is pixel / 255 already)."""
    from .data.loader import mean_std

    mean, std = mean_std(meta.mean, meta.std, meta.normalize)
    m, s = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x.detach().float() * s + m).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def saliency_maps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                  tta: str | None = None, steps: int = STEPS) -> np.ndarray:
    """Integrated Gradients (Captum) of each image's `targets` class through the logits as
    evaluated (engine.logits with `tta`), from an all-zero baseline in the normalised space
    (an image of the dataset's mean colour; black for a model without normalisation):
    |attribution| summed over channels and scaled to a peak of 1 per image, (N, H, W)."""
    from captum.attr import IntegratedGradients

    gradients = IntegratedGradients(partial(logits, model, tta=tta))
    with torch.enable_grad():
        found = gradients.attribute(x, baselines=torch.zeros_like(x), target=targets,
                                    n_steps=steps, internal_batch_size=steps)
    heat = found.detach().abs().sum(1)
    peak = heat.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (heat / peak).cpu().numpy()


# ---- the pictures ----------------------------------------------------------------------------
# Laid out by fixed sizes in inches, not by tight_layout (which draws each figure once more)

_CELL = 1.6  # inches: an image's width
_LINE = 0.16  # inches: a line of an 8-point title
_GAP = 0.08  # of an image's width: between the images of a row


def _grid(rows: int, cols: int, aspect: float, heading: str, cell: float = _CELL
          ) -> tuple[Figure, np.ndarray]:
    """A Figure of rows x cols axes `cell` inches wide for images of height/width `aspect`,
    room above each for a two-line title and above all for `heading`; (figure, axes rows x
    cols)."""

    image_h, band, head, gap, pad = cell * aspect, 2 * _LINE + 0.06, 0.32, 0.12, 0.1
    width = cols * cell + (cols - 1) * gap + 2 * pad
    height = rows * (image_h + band) + head + pad
    fig = new_figure((width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=pad / width, right=1 - pad / width, bottom=pad / height,
                        top=1 - (head + band) / height, wspace=gap / cell,
                        hspace=band / image_h)
    fig.suptitle(heading, y=1 - 0.08 / height, va="top", fontsize=10)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def _aspect(found: Mistakes, tiles: int = 1) -> float:
    """Height / width of `tiles` images side by side (a `_row`), within 1:2 and 2:1 each."""
    height, width = next(iter(found.pixels.values())).shape[:2]
    return min(2.0, max(0.5, height / width)) / (tiles + (tiles - 1) * _GAP)


def _row(images: list[np.ndarray]) -> np.ndarray:
    """Images side by side, white between them (a _GAP of their width)."""
    height, width, channels = images[0].shape
    gap = np.ones((height, max(1, round(_GAP * width)), channels), dtype=images[0].dtype)
    return np.concatenate([part for image in images for part in (gap, image)][1:], axis=1)


def _show(ax: Axes, image: np.ndarray, title: str) -> None:
    """An image (H, W, C in [0, 1]) on `ax`: gray for one channel, RGB for three."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image)
    ax.set_title(title, fontsize=8)


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def _caption(top: dict) -> str:
    """What a top loss is ordered by first (its loss), then what was predicted and how
    surely (the probability the model gave the predicted class)."""
    return (f"loss {top['loss']:.2f}, true {_short(top['true'])}\n"
            f"predicted {_short(top['pred'])} (p {top['prob']:.2f})")


def plot_top_losses(found: Mistakes, path: Path) -> Path:
    """The top losses in a grid, highest first, each titled with its loss (what they are
    ordered by), its true and predicted class and the predicted class's probability."""

    n = len(found.top_losses)
    cols = math.ceil(math.sqrt(n))
    fig, axes = _grid(math.ceil(n / cols), cols, _aspect(found),
                      "Top losses, highest first: the most confidently wrong")
    for ax, top in zip(axes.ravel(), found.top_losses):
        _show(ax, found.pixels[top["index"]], _caption(top))
    return save_figure(fig, path)


def plot_saliency(found: Mistakes, path: Path) -> Path:
    """Each top loss with a saliency map: the image beside its map overlaid on it."""

    shown = [t for t in found.top_losses if t["index"] in found.saliency]
    fig, axes = _grid(len(shown), 2, _aspect(found), "Integrated Gradients, predicted class")
    for (left, right), top in zip(axes, shown):
        image = found.pixels[top["index"]]
        _show(left, image, _caption(top))
        _show(right, image, f"attribution to\n{_short(top['pred'])}")
        right.imshow(found.saliency[top["index"]], cmap="inferno", vmin=0, vmax=1, alpha=0.6)
    return save_figure(fig, path)


def plot_confused(found: Mistakes, path: Path) -> Path:
    """A row per confused pair, titled `true -> predicted (count)` and the indices in the
    split of its examples, drawn side by side (one image a row: quicker than an axes each)."""

    fig, axes = _grid(len(found.pairs), 1, _aspect(found, EXAMPLES), "Most confused classes",
                      cell=EXAMPLES * _CELL)
    full = _row([found.pixels[found.pairs[0]["examples"][0]]] * EXAMPLES).shape[1]
    for (ax,), pair in zip(axes, found.pairs):
        _show(ax, _row([found.pixels[i] for i in pair["examples"]]),
              f"{_short(pair['true'], 30)} -> {_short(pair['pred'], 30)} ({pair['count']})\n"
              + ", ".join(f"#{i}" for i in pair["examples"]))
        ax.set_xlim(-0.5, full - 0.5)  # fewer examples: the same scale, left-aligned
    return save_figure(fig, path)


def files_line(files: dict[str, str]) -> str:
    """Where an evaluation's mistakes were drawn (save_eval's paths), in one line."""
    drawn = [files[name] for name in FIGURES if name in files]
    return (f"mistakes: {', '.join(drawn)}" if drawn
            else "mistakes: none, every image was classified correctly")
