"""Use a trained model: load it from a checkpoint alone, preprocess like training did, and
score it on a labelled split (accuracy, loss, per-class precision/recall, confusion)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CnnlabError
from .models import create_model
from .runs import load_checkpoint


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best.pt (else its checkpoint.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "checkpoint.pt"):
            if (p / name).is_file():
                return p / name
        raise CnnlabError(f"{p} holds no best.pt or checkpoint.pt; is it a run directory?")
    if not p.is_file():
        raise CnnlabError(f"no checkpoint or run directory at {p}")
    return p


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict, dict]:
    """(model in eval mode, model_meta, checkpoint) from a checkpoint or run directory."""
    ckpt = load_checkpoint(checkpoint_path(path), map_location=device)
    meta = ckpt.get("model_meta")
    if not isinstance(meta, dict) or "model" not in ckpt:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no model_meta)")
    model = create_model(meta["name"], in_channels=meta["in_channels"],
                         num_classes=meta["num_classes"], image_size=tuple(meta["image_size"]),
                         **meta.get("options", {}))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), meta, ckpt


def preprocess(images: torch.Tensor, meta: dict) -> torch.Tensor:
    """uint8 (N, C, H, W) -> the float input the model was trained on."""
    x = images.float() / 255
    if meta.get("normalize", True):
        mean = torch.tensor(meta["mean"], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"], device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, meta: dict, *,
                   batch_size: int = 1000, tta_flip: bool = False) -> torch.Tensor:
    """Logits for uint8 images, in batches; `tta_flip` averages with the mirrored images."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start:start + batch_size].to(device), meta)
        logits = model(x).float()
        if tta_flip:
            logits = (logits + model(x.flip(3)).float()) / 2
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.empty(0, meta["num_classes"])


def score(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy (%), mean cross-entropy, per-class precision/recall and the confusion matrix
    (rows: true class, columns: predicted class)."""
    n = len(classes)
    labels = labels.long()
    pred = logits.argmax(1)
    confusion = torch.bincount(labels * n + pred, minlength=n * n).view(n, n)
    tp = confusion.diag().double()
    predicted, actual = confusion.sum(0).double(), confusion.sum(1).double()
    per_class = [{"class": c, "precision": _pct(tp[i], predicted[i]),
                  "recall": _pct(tp[i], actual[i]), "support": int(actual[i])}
                 for i, c in enumerate(classes)]
    return {"accuracy": 100.0 * tp.sum().item() / max(1, len(labels)),
            "loss": F.cross_entropy(logits, labels).item() if len(labels) else float("nan"),
            "per_class": per_class, "confusion": confusion.tolist()}


def _pct(num: torch.Tensor, den: torch.Tensor) -> float:
    return 100.0 * num.item() / den.item() if den.item() else 0.0
