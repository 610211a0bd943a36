"""The checkpoint format: the one module that writes, reads and checks checkpoint files.

A checkpoint is a dict saved with `torch.save` and loaded with `weights_only=True` (tensors
and plain data only, so a crafted file cannot run code):

    format          FORMAT (absent in the first release's files, which have the same keys)
    model           the weights a run evaluates (with --ema, the averaged weights)
    train_model     with --ema: the trained weights
    model_meta      ModelMeta as a dict: what rebuilds the model and its preprocessing
    config          the run's Config as a dict
    data_digest     the content digest of the dataset trained on (Dataset.digest)
    epoch, step, batch, loop, rng, device_type, optimizer, scheduler, scaler,
    metrics_offset  where training was, to resume it bitwise (see `restore`)
    test_acc        the test accuracy of the last evaluation (None before the first)

Training (`state`, `save`, `restore`), `--resume` (`load_for_resume`) and eval, predict,
export and report (`load_model`) all go through here.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CnnlabError, one_line
from .files import atomic_write

if TYPE_CHECKING:
    from .config import Config
    from .data import Dataset
    from .engine import LoopState
    from .trainer import Training

FORMAT = 1
NAMES = ("best.pt", "checkpoint.pt")  # what a run directory holds, in the order eval prefers


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a trained model and prepare its input, without the
    training config or the dataset."""

    name: str                      # the model registry's name
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]    # (height, width)
    classes: tuple[str, ...]
    mean: tuple[float, ...]        # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    normalize: bool = True         # False: the input is pixel / 255 (the lab report's ToTensor)
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"pool": "avg"}
    fit: str = "resize"            # how an image of another size is made image_size: "resize"
    #                                (stretched), "crop" (shorter side, then centre crop)

    @classmethod
    def of(cls, cfg: Config, data: Dataset) -> ModelMeta:
        return cls(name=cfg.model, in_channels=data.channels, num_classes=len(data.classes),
                   image_size=data.image_size, classes=tuple(data.classes),
                   mean=tuple(data.mean), std=tuple(data.std), normalize=cfg.normalize,
                   options={"pool": cfg.pool} if cfg.pool else {},
                   fit="crop" if cfg.image_size else "resize")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, meta: object, path: str | Path) -> ModelMeta:
        """The model_meta of checkpoint `path`, checked to be complete and consistent."""
        if not isinstance(meta, dict):
            raise CnnlabError(f"{path} is not a cnnlab checkpoint (no model_meta); give a "
                              "checkpoint or run directory written by `cnnlab train`")
        required = ("name", "in_channels", "num_classes", "image_size", "classes", "mean",
                    "std")
        missing = [k for k in required if k not in meta]
        if missing:
            raise CnnlabError(f"{path} is an incomplete cnnlab checkpoint: model_meta lacks "
                              f"{', '.join(missing)}")
        try:
            parsed = cls(name=str(meta["name"]), in_channels=int(meta["in_channels"]),
                         num_classes=int(meta["num_classes"]),
                         image_size=tuple(int(s) for s in meta["image_size"]),
                         classes=tuple(str(c) for c in meta["classes"]),
                         mean=tuple(float(m) for m in meta["mean"]),
                         std=tuple(float(s) for s in meta["std"]),
                         normalize=bool(meta.get("normalize", True)),
                         options=dict(meta.get("options") or {}),
                         fit=str(meta.get("fit", "resize")))
        except (TypeError, ValueError):
            parsed = None
        if parsed is None or not parsed.consistent():
            raise CnnlabError(
                f"{path} has inconsistent model_meta (channels {meta['in_channels']}, classes "
                f"{meta['num_classes']}, image size {meta['image_size']}, mean/std per "
                "channel); the checkpoint is damaged")
        return parsed

    def consistent(self) -> bool:
        return (len(self.image_size) == 2 and min(self.image_size) > 0 and self.in_channels > 0
                and len(self.classes) == self.num_classes
                and len(self.mean) == len(self.std) == self.in_channels
                and self.fit in ("resize", "crop"))

    def build(self) -> nn.Module:
        """The model, with freshly initialised weights."""
        from .models import create_model

        return create_model(self.name, in_channels=self.in_channels,
                            num_classes=self.num_classes, image_size=self.image_size,
                            **self.options)


# ---- writing and reading files ---------------------------------------------------------------

def save(ckpt: dict[str, Any], *paths: str | Path) -> None:
    """Write `ckpt` to each of `paths` atomically: a reader sees the previous file or this
    one. It is serialised once, in memory, so that a full disk is an OSError naming the path
    (torch.save writing to the disk itself reports it as a RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    for path in paths:
        atomic_write(path, buffer.getbuffer())


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file's dict, loaded without running code from it (weights_only)."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CnnlabError(f"checkpoint not found: {path}") from None
    except Exception as e:  # unpickling errors come in many types
        raise CnnlabError(f"cannot load checkpoint {path}: it is damaged or holds more than "
                          f"tensors and plain data ({one_line(e, 200)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no model weights and "
                          "model_meta); give a checkpoint or run directory written by "
                          "`cnnlab train`")
    version = ckpt.get("format", FORMAT)
    if not isinstance(version, int) or version > FORMAT:
        raise CnnlabError(f"{path} has checkpoint format {version!r}, newer than this cnnlab "
                          f"reads ({FORMAT}); upgrade cnnlab")
    return ckpt


def find(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best.pt (else its checkpoint.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in NAMES:
            if (p / name).is_file():
                return p / name
        if (p / "config.json").is_file():
            raise CnnlabError(f"run directory {p} has no checkpoint yet (best.pt or "
                              "checkpoint.pt); did its training stop before the first epoch "
                              "ended?")
        raise CnnlabError(f"{p} holds no best.pt or checkpoint.pt; is it a run directory?")
    if not p.exists():
        raise CnnlabError(f"no checkpoint or run directory at {p}")
    if not p.is_file():
        raise CnnlabError(f"{p} is not a checkpoint file or a run directory")
    return p


@dataclass(frozen=True)
class Trained:
    """A trained model loaded for use (eval, predict, export, report)."""

    path: Path
    model: nn.Module               # in eval mode
    meta: ModelMeta
    config: dict[str, Any]         # the training config ({} for a bare checkpoint)
    epoch: int | None
    test_acc: float | None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """The model of a checkpoint file or a run directory (its best.pt), ready to use."""
    file = find(path)
    ckpt = load(file, map_location=device)
    meta = ModelMeta.from_dict(ckpt.get("model_meta"), file)
    model = meta.build()
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CnnlabError(f"{file}: the stored weights do not fit {meta.name} "
                          f"({one_line(e, 200)}); the checkpoint is damaged") from None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return Trained(file, model.to(device).eval(), meta, config, ckpt.get("epoch"),
                   ckpt.get("test_acc"))


# ---- training state --------------------------------------------------------------------------

def state(training: Training, loop: LoopState, metrics_offset: int) -> dict[str, Any]:
    """Everything `restore` needs to continue training bitwise as if never stopped."""
    scaler, device = training.precision.scaler, training.device
    return {
        "format": FORMAT,
        "model": training.evaluated.state_dict(),  # with --ema, the average; else the weights
        **({"train_model": training.model.state_dict()} if training.ema else {}),
        **({"lookahead": training.lookahead.module.state_dict()} if training.lookahead else {}),
        "model_meta": training.meta.to_dict(), "config": training.cfg.to_dict(),
        "data_digest": training.data.digest,
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "epoch": loop.epoch - 1, "step": loop.step, "batch": loop.batch,  # epochs finished
        "test_acc": loop.history[-1] if loop.history else None,
        "val_acc": loop.last_val["accuracy"] if loop.last_val else None,
        "loop": {k: v for k, v in vars(loop).items() if k not in ("epoch", "step", "batch")},
        "rng": {"torch": torch.get_rng_state(), "loader": training.generator.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "device_type": device.type,
        "scaler": scaler.state_dict() if scaler else None,
        "metrics_offset": metrics_offset,
    }


def load_for_resume(run_dir: str | Path) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """(the run's config as a dict, epochs it finished, the checkpoint) of the run directory's
    checkpoint.pt."""
    path = Path(run_dir) / "checkpoint.pt"
    ckpt = load(path)
    if not isinstance(ckpt.get("config"), dict) or "loop" not in ckpt:
        raise CnnlabError(f"{path} holds a model but not the state of a training run; "
                          "it cannot be resumed")
    return ckpt["config"], int(ckpt["epoch"]), ckpt


def restore(ckpt: dict[str, Any], training: Training, loop: LoopState) -> int:
    """Put every piece of training state back as it was when `ckpt` was written; returns
    the byte offset metrics.jsonl had then."""
    device = training.device
    digest = ckpt.get("data_digest")
    if digest is not None and digest != training.data.digest:
        raise CnnlabError(f"the dataset {training.cfg.dataset} is not the one this run was "
                          "trained on (images, labels or classes changed since); resume with "
                          "that data, or start a new run")
    saved = ckpt.get("device_type", "cpu")
    if saved != device.type:
        raise CnnlabError(f"this run was trained on {saved} and can only resume there "
                          f"(its random state is {saved}'s); pass --device {saved}")
    training.evaluated.load_state_dict(ckpt["model"])
    if training.ema:
        training.model.load_state_dict(ckpt["train_model"])
    if training.lookahead:
        training.lookahead.module.load_state_dict(ckpt["lookahead"])
    training.optimizer.load_state_dict(ckpt["optimizer"])
    training.scheduler.load_state_dict(ckpt["scheduler"])
    if training.precision.scaler and ckpt.get("scaler"):
        training.precision.scaler.load_state_dict(ckpt["scaler"])
    for key, value in ckpt["loop"].items():
        setattr(loop, key, value.to(device) if isinstance(value, torch.Tensor) else value)
    loop.epoch, loop.step, loop.batch = ckpt["epoch"] + 1, ckpt["step"], ckpt["batch"]
    if "best_epoch" not in ckpt["loop"] and loop.history:  # written before it was kept
        loop.best_epoch = loop.history.index(loop.best_acc) + 1
    torch.set_rng_state(ckpt["rng"]["torch"])
    training.generator.set_state(ckpt["rng"]["loader"])
    if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return int(ckpt["metrics_offset"])
