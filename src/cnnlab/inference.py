"""Use a trained model: prepare its input as training did and score it on a labelled split
(accuracy, loss, per-class precision/recall, confusion). Models are loaded from checkpoints
alone (`checkpoint.load_model`): neither the training config nor the dataset is needed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .checkpoint import ModelMeta
from .checks import check_option
from .config import data_dir_for
from .data.disk import DiskArray
from .devices import resolve_precision
from .engine import Precision, logits
from .errors import CnnlabError
from .files import safe_name, write_json
from .options import OPTIONS, TTAS
from .plots import plot_confusion
from .presets import flips
from .progress import Phase
from .results import format_epochs
from .runs import RUN_FILES

if TYPE_CHECKING:
    from .mistakes import Mistakes

SPLITS = ("test", "train")


def preprocess(images: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """uint8 (N, C, H, W) -> the float input the model was trained on (bit for bit what
    the training loader feeds the model: the same normalisation function)."""
    from .data.loader import normalization

    scale, shift = normalization(meta.mean, meta.std, meta.normalize, images.device)
    return torch.addcmul(shift, images.float(), scale)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor | np.ndarray | DiskArray,
                   meta: ModelMeta, *,
                   batch_size: int = 1000, tta: str | None = None,
                   precision: Precision | None = None,
                   on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """fp32 logits for uint8 images (a tensor, or an array in memory or on disk), in
    batches, with test-time averaging `tta` (engine.logits), computed in `precision`
    (default fp32); `on_batch(images in it)` after each batch (progress)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = preprocess(torch.as_tensor(images[start:start + batch_size]).to(device), meta)
        with precision.autocast() if precision else contextlib.nullcontext():
            out.append(logits(model, x, tta).cpu())  # to the host: the batch is done
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(out) if out else torch.empty(0, meta.num_classes)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor,
                           classes: list[str] | tuple[str, ...]) -> dict:
    """Accuracy (%), mean cross-entropy, per-class precision/recall and the confusion matrix
    (rows: true class, columns: predicted class)."""
    n = len(classes)
    labels = labels.long()
    pred = scores.argmax(1)
    confusion = torch.bincount(labels * n + pred, minlength=n * n).view(n, n)
    tp = confusion.diag().double()
    predicted, actual = confusion.sum(0).double(), confusion.sum(1).double()
    per_class = [{"class": c, "precision": _share(tp[i], predicted[i]),
                  "recall": _share(tp[i], actual[i]), "support": int(actual[i])}
                 for i, c in enumerate(classes)]
    return {"accuracy": 100.0 * tp.sum().item() / max(1, len(labels)),
            "loss": F.cross_entropy(scores, labels).item() if len(labels) else float("nan"),
            "per_class": per_class, "confusion": confusion.tolist()}


def _share(num: torch.Tensor, den: torch.Tensor) -> float:
    return 100.0 * num.item() / den.item() if den.item() else 0.0


# ---------------------------------------------------------------- cnnlab eval

def evaluate_checkpoint(checkpoint_or_run: str | Path, *, dataset: str | None = None,
                        split: str = "test", data_dir: str | Path | None = None,
                        download: bool = True, tta: str | None = None,
                        batch_size: int | None = None, precision: str = "fp32",
                        device: str | torch.device = "cpu", data=None,
                        progress: bool | str = True, mistakes: int = 0,
                        trust_code: bool = False) -> dict:
    """Score a checkpoint (or a run directory's best.pt) on a labelled split.

    `dataset` and `data_dir` default to those the model was trained on; `data`, the
    Dataset already loaded (then `dataset` only names it), saves reading it again.
    `tta` ("flip", "flip,translate", see engine.logits) averages the logits of each image
    and its mirrored (and shifted) copies (only for models trained with flips); by default
    as training scored the model; `tta="none"`: without. `precision`: fp32, bf16, fp16 or
    auto (as training chooses it for the model on `device`).
    `progress`: show it per batch (progress.Phase: a bar on a terminal, else a line every
    QUIET_SECONDS - a ResNet-18 takes minutes on a CPU), named by the text given or after
    the checkpoint; False: nothing. `mistakes` > 0: also the model's mistakes (that many top
    losses, see mistakes.find_mistakes), as a mistakes.Mistakes under "mistakes".
    `trust_code`: see checkpoint.load_model.
    Returns accuracy (%), loss, per_class, confusion and what was evaluated. Raises
    CnnlabError (DataMismatch where the data does not fit the model)."""
    from .data import load_dataset

    if split not in SPLITS:
        raise CnnlabError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    check_option("tta", tta)
    check_option("precision", precision)
    if batch_size is not None and batch_size <= 0:
        raise CnnlabError(f"--batch-size must be positive, got {batch_size}")
    if mistakes < 0:
        raise CnnlabError(f"--mistakes must be 0 (none) or more, got {mistakes}")
    trained = checkpoint.load_model(checkpoint_or_run, device, trust_code=trust_code)
    file, meta, config = trained.path, trained.meta, trained.config
    where = torch.device(device)
    amp = Precision(resolve_precision(precision, where, meta.name), where)
    if tta is None:  # as training scored the model
        tta = config.get("tta") if config.get("tta") in TTAS else "none"
    tta = None if tta == "none" else tta
    if tta is not None and not flips(str(config.get("augment") or "")):
        raise CnnlabError(f"--tta {tta}: {file} was not trained with flips (augment "
                          f"'{config.get('augment', 'unknown')}'); mirrored images are new to "
                          "it, so flip averaging would not measure the model; drop --tta")
    dataset = dataset or config.get("dataset")
    if not dataset:
        raise CnnlabError(f"{file} does not say which dataset it was trained on; "
                          "give --dataset")
    if data is None:  # trained on photos decoded each epoch: the test split alone decoded
        data = load_dataset(dataset, data_dir_for(data_dir, config), download=download,
                            image_size=meta.image_size if meta.fit == "crop" else None,
                            photos=split == "test"
                            and "resized-crop" in str(config.get("augment")))
    check_dataset_fits(data, meta, dataset)
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    if len(y) == 0:
        raise CnnlabError(f"{dataset} has no {split} images")
    batch_size = batch_size or int(config.get("eval_batch_size")
                                   or OPTIONS["eval_batch_size"].default)
    what = (progress if isinstance(progress, str)
            else f"evaluating {file} on the {dataset} {split} split")
    with Phase(what, len(y), "images", enabled=bool(progress)) as phase:
        scores = predict_logits(trained.model, x, meta, batch_size=batch_size, tta=tta,
                                precision=amp, on_batch=phase.update)
    result = classification_metrics(scores, torch.from_numpy(y), meta.classes)
    if mistakes:  # of the logits just scored
        result["mistakes"] = _mistakes(trained, x, y, scores, mistakes, tta)
    return {"checkpoint": str(file), "model": meta.name, "epoch": trained.epochs_done,
            "dataset": dataset, "split": split, "tta": tta, "precision": amp.name,
            "images": len(y), "classes": list(meta.classes), **result}


def _mistakes(trained: checkpoint.Trained, images: np.ndarray, labels: np.ndarray,
              scores: torch.Tensor, shown: int, tta: str | None) -> Mistakes:
    """The mistakes of the evaluation's logits `scores` of the split's uint8
    `images` and `labels`."""
    from .mistakes import find_mistakes

    return find_mistakes(trained.model, trained.meta, images, labels, scores, shown=shown,
                         tta=tta, prepare=partial(preprocess, meta=trained.meta))


class DataMismatch(CnnlabError):
    """The images or classes of a dataset are not those the model was trained on."""


def check_dataset_fits(data, meta: ModelMeta, dataset: str) -> None:
    """Refuse a dataset whose images or classes are not those the model was trained on."""
    shape = (data.channels, *data.image_size)
    expected = (meta.in_channels, *meta.image_size)
    if shape != expected:
        raise DataMismatch(f"{dataset} has {_shape(shape)} images but the model takes "
                           f"{_shape(expected)}; evaluate it on the dataset it was trained on")
    if list(data.classes) != list(meta.classes):
        raise DataMismatch(f"{dataset} has classes {_names(data.classes)} but the model was "
                           f"trained on {_names(meta.classes)}")


def _shape(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}x{shape[2]} (channels x height x width)"


def _names(classes: list[str] | tuple[str, ...], limit: int = 12) -> str:
    shown = ", ".join(classes[:limit])
    return f"[{shown}{', ...' if len(classes) > limit else ''}] ({len(classes)})"


def eval_stem(result: dict) -> str:
    """The name the evaluation's files share: eval-<checkpoint>-<dataset>-<split>[-tta]."""
    name = Path(result["dataset"].removeprefix("folder:").rstrip("/\\")).name
    stem = f"{Path(result['checkpoint']).stem}-{safe_name(name, 'folder')}-{result['split']}"
    return stem + (f"-tta-{result['tta']}" if result.get("tta") else "")


def save_eval(result: dict, out_dir: str | Path) -> dict[str, str]:
    """Write eval-<...>.json and confusion-<...>.png into out_dir (training's files are
    never touched), and the pictures of result["mistakes"] (evaluate_checkpoint(mistakes=N))
    as top_losses-, saliency- and confused-<...>.png, which it then lists in place of their
    data. Returns {"json": path, "png": path} and the pictures by mistakes.FIGURES' names."""
    from .mistakes import Mistakes

    out_dir = Path(out_dir)
    stem = eval_stem(result)
    paths = {"json": out_dir / f"eval-{stem}.json", "png": out_dir / f"confusion-{stem}.png"}
    assert not any(p.name in RUN_FILES for p in paths.values())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(result.get("mistakes"), Mistakes):
            paths |= result["mistakes"].draw(out_dir, suffix=f"-{stem}")
            result["mistakes"] = result["mistakes"].to_dict()
        write_json(paths["json"], result)
        tta = f", TTA {result['tta']}" if result.get("tta") else ""
        plot_confusion(result["confusion"], result["classes"], paths["png"],
                       title=f"{result['model']} on {result['dataset']} {result['split']}"
                             f"{tta}: {result['accuracy']:.2f}%")
    except OSError as e:
        raise CnnlabError(f"cannot write the evaluation into {out_dir}: {e.strerror or e}; "
                          "choose another folder with --out-dir") from None
    return {k: str(v) for k, v in paths.items()}


def format_eval(result: dict) -> str:
    """The evaluation as text: accuracy, loss, per-class table, confusion matrix."""
    lines = [f"{result['model']} ({Path(result['checkpoint']).name}"
             + (f", epoch {format_epochs(result['epoch'])}"
                if result.get("epoch") is not None else "")
             + f") on {result['dataset']} {result['split']}"
             + (f" with TTA {result['tta']}" if result.get("tta") else "")
             + f": {result['images']} images",
             f"accuracy {result['accuracy']:.2f}%   loss {result['loss']:.4f}", ""]
    width = max(5, *(len(c) for c in result["classes"]))
    lines.append(f"{'class':<{width}}  {'precision':>10}  {'recall':>8}  {'support':>7}")
    for row in result["per_class"]:
        lines.append(f"{row['class']:<{width}}  {row['precision']:9.2f}%  {row['recall']:7.2f}%"
                     f"  {row['support']:7d}")
    conf = result["confusion"]
    cell = max(3, *(len(str(v)) for r in conf for v in r))
    lines += ["", "confusion matrix (rows: true class, columns: predicted class, by index)",
              f"{'':>3} {'':<{width}} " + " ".join(f"{j:>{cell}}" for j in range(len(conf)))]
    for i, (name, r) in enumerate(zip(result["classes"], conf)):
        lines.append(f"{i:>3} {name:<{width}} " + " ".join(f"{v:>{cell}}" for v in r))
    return "\n".join(lines)
