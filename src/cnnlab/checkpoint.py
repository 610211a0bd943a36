"""The checkpoint format: the one module that writes, reads and checks checkpoint files.

A checkpoint is a dict saved with `torch.save` and loaded with `weights_only=True` (tensors
and plain data only, so a crafted file cannot run code):

    format          FORMAT (absent in the first release's files, which have the same keys)
    model           the weights a run evaluates (with --ema, the averaged weights)
    train_model     with --ema: the trained weights
    lookahead       with --lookahead: the slow weights
    model_meta      ModelMeta as a dict: what rebuilds the model and its preprocessing
    config          the run's Config as a dict
    data_digest     the content digest of the dataset trained on (Dataset.digest)
    epoch, step, batch, loop, rng, device_type, optimizer, scheduler, scaler,
    metrics_offset  where training was, to resume it bitwise (see `check_fits`)
    test_acc        the test accuracy of the last evaluation (None before the first)
    val_acc         the same on the validation split, where there is one

The training state in it is engine.TrainState.state_dict() (plain data); the trainer adds
the rest. Training (`save`), `--resume` (`load_for_resume`, `check_fits`) and eval, predict,
export and report (`load_model`) all go through here; nothing here knows the trainer.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CnnlabError, one_line
from .files import atomic_link, atomic_write
from .models import code, create_model
from .runs import BEST, CHECKPOINT, CONFIG, MODEL_SOURCE

FORMAT = 1
NAMES = (BEST, CHECKPOINT)  # what a run directory holds, in the order eval prefers


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
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"pool": "avg"}; a model
    #                                from code or by name: its constructor's arguments
    fit: str = "resize"            # how an image of another size is made image_size: "resize"
    #                                (stretched), "crop" (shorter side, then centre crop)
    source: dict[str, Any] | None = None  # the user's own model: models.code.Source

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
                         fit=str(meta.get("fit", "resize")),
                         source=meta.get("source"))
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

    def build(self, run_dir: Path | None = None, *, trust: bool = False,
              found: Any = None, pretrained: bool = False) -> nn.Module:
        """The model, with freshly initialised weights (`pretrained`: torchvision's or timm's
        published ones, with a new classifier). The user's own model is built from
        `found` (its class or function), else from the copy of its source that `run_dir`
        keeps (models.code.load_kept: refused unless it is the user's own file, unchanged,
        or `trust`)."""
        if self.source is not None and found is None:
            copy = run_dir / MODEL_SOURCE if run_dir is not None else None
            found = code.load_kept(code.Source.from_dict(self.source), copy, trust=trust)
        return create_model(self.name, in_channels=self.in_channels,
                            num_classes=self.num_classes, image_size=self.image_size,
                            pretrained=pretrained, found=found, **self.options)


# ---- writing and reading files ---------------------------------------------------------------

def save(ckpt: dict[str, Any], *paths: str | Path) -> None:
    """Write `ckpt` to each of `paths` atomically: a reader sees the previous file or this
    one. It is serialised once, in memory, so that a full disk is an OSError naming the path
    (torch.save writing to the disk itself reports it as a RuntimeError), and written once:
    the other paths are hard links to the first where the file system has them."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    first, *others = paths
    atomic_write(first, buffer.getbuffer())
    for path in others:
        if not atomic_link(first, path):
            atomic_write(path, buffer.getbuffer())


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file's dict, loaded without running code from it (weights_only). torch's
    refusal advises loading the file again with weights_only off, which would run whatever
    code it holds: the message says instead what the file asks for, and that it is refused."""
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol: the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CnnlabError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as e:  # what the weights-only unpickler refuses
        asks = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CnnlabError(f"{path} holds more than tensors and plain data"
                          f"{f' (it asks for {asks[1]})' if asks else ''}, so it is refused "
                          "unread; cnnlab loads only checkpoints written by cnnlab train") from None
    except Exception as e:  # a cut or overwritten file fails in many types
        raise CnnlabError(f"cannot load checkpoint {path}: it is damaged or not a checkpoint "
                          f"({one_line(e, 200)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no model weights and "
                          "model_meta); give a checkpoint or run directory written by "
                          "`cnnlab train`")
    version = ckpt.get("format", FORMAT)
    if not isinstance(version, int) or version > FORMAT:
        raise CnnlabError(f"{path} has checkpoint format {version!r}, newer than this cnnlab "
                          f"reads ({FORMAT}); upgrade cnnlab")
    return _renamed(ckpt)


def _renamed(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of a ResNet written before its layers took torchvision's names, with
    those names (its weights, and those of its weight averages)."""
    from .models.resnet import torchvision_names

    meta = ckpt.get("model_meta")
    if not isinstance(meta, dict) or not str(meta.get("name", "")).startswith("resnet"):
        return ckpt
    return ckpt | {key: torchvision_names(ckpt[key]) for key in ("model", "train_model",
                                                                  "lookahead")
                   if isinstance(ckpt.get(key), dict)}


def find(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best.pt (else its checkpoint.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in NAMES:
            if (p / name).is_file():
                return p / name
        if (p / CONFIG).is_file():
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
    epochs_done: float | None      # the count the report uses: 1.5 after 1.5 epochs
    test_acc: float | None


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               trust_code: bool = False) -> Trained:
    """The model of a checkpoint file or a run directory (its best.pt), ready to use; the
    user's own model from the copy of its source beside the checkpoint (see ModelMeta.build)."""
    file = find(path)
    ckpt = load(file, map_location=device)
    meta = ModelMeta.from_dict(ckpt.get("model_meta"), file)
    model = meta.build(file.parent, trust=trust_code)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CnnlabError(f"{file}: the stored weights do not fit {meta.name} "
                          f"({one_line(e, 200)}); the checkpoint is damaged") from None
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    # checkpoints written before they held epochs_done: the whole epochs they had finished
    return Trained(file, model.to(device).eval(), meta, config,
                   ckpt.get("epochs_done", ckpt.get("epoch")), ckpt.get("test_acc"))


# ---- training state --------------------------------------------------------------------------

def load_for_resume(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint.pt of a run directory, every field checked (`check_resumable`)."""
    path = Path(run_dir) / CHECKPOINT
    ckpt = load(path)
    if "config" not in ckpt and "loop" not in ckpt:
        raise CnnlabError(f"{path} holds a model but not the state of a training run; "
                          "it cannot be resumed")
    check_resumable(ckpt, path)
    return ckpt


@dataclass(frozen=True)
class ResumeTarget:
    """What a checkpoint to resume must fit, of the run as built again: its training state
    (engine.TrainState.state_dict() before any step), the shapes of the optimiser's
    parameters in its order, the data's digest and size, and the run's length."""

    fresh: dict[str, Any]
    parameter_shapes: list[torch.Size]
    data_digest: str
    dataset: str
    images: int                    # training images (of this rank's loader)
    batches: int                   # batches an epoch
    total_steps: int


def check_fits(ckpt: dict[str, Any], run: ResumeTarget, path: str | Path = CHECKPOINT) -> None:
    """Refuse a checkpoint (the file `path`, its fields' types checked) that does not fit
    `run`: another dataset or device, or a piece of state damaged - before anything is
    loaded, rather than failing in the middle of training after the run's files were
    written again."""
    digest = ckpt.get("data_digest")
    if digest is not None and digest != run.data_digest:
        raise CnnlabError(f"the dataset {run.dataset} is not the one this run was trained on "
                          "(images, labels or classes changed since); resume with that data, "
                          "or start a new run")
    saved = ckpt.get("device_type", "cpu")
    if saved != run.fresh["device_type"]:
        raise CnnlabError(f"this run was trained on {saved} and can only resume there "
                          f"(its random state is {saved}'s); pass --device {saved}")
    if problem := _misfit(ckpt, run):
        raise damaged(path, problem)


# ---- checking a checkpoint before resuming from it -------------------------------------------

def damaged(path: str | Path, what: str) -> CnnlabError:
    """The refusal of a checkpoint that --resume cannot use: without it the run starts again
    from config.json."""
    return CnnlabError(f"{path} is damaged ({what}); remove it to train the run again from "
                       "the start")


# Fields that cnnlab wrote only from some version on: where one is absent, its default stands
# in (LoopState's; for the digest, no check; for the device, the CPU). The others must be there.
_LATER = frozenset({"data_digest", "device_type", "loop.best_epoch", "loop.last_eval",
                    "loop.last_val", "loop.best_test", "loop.compile_seconds",
                    "loop.window_correct", "loop.window_images"})
_COUNTS = ("epoch", "step", "batch", "metrics_offset", "loop.window_steps", "loop.images",
           "loop.best_epoch", "loop.window_images")  # never below 0
_EVALUATION = {"loss": float, "accuracy": float}  # engine.evaluate's result


def _resumable_fields() -> dict[str, Any]:
    """Every field a checkpoint holds for --resume, by dotted name, with its type: a dict
    before its fields, which are checked only where it is a dict. The loop's fields have
    LoopState's own types."""
    from .engine import POSITION, LoopState

    hints = typing.get_type_hints(LoopState)
    return {
        "config": dict, "epoch": int, "step": int, "batch": int, "metrics_offset": int,
        "model": dict[str, torch.Tensor], "data_digest": str | None, "device_type": str,
        "optimizer": dict, "optimizer.state": dict, "optimizer.param_groups": list[dict],
        "scheduler": dict, "scaler": dict | None,
        "rng": dict, "rng.torch": torch.Tensor, "rng.loader": torch.Tensor,
        "rng.cuda": torch.Tensor | None,
        "loop": dict, **{f"loop.{f.name}": hints[f.name] for f in dataclasses.fields(LoopState)
                         if f.name not in POSITION},
        **{f"loop.{split}.{key}": kind for split in ("last_eval", "last_val")
           for key, kind in _EVALUATION.items()},
    }


def check_resumable(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse, naming the field, a checkpoint that --resume would otherwise trip over with a
    traceback: a field missing, of the wrong type, or a count below 0. Before any is used."""
    fields = _resumable_fields()
    for name, kind in fields.items():
        holder, key = _holder(ckpt, name)
        if not isinstance(holder, dict):  # the dict it is in is None where that may be
            continue
        if key not in holder:
            if name in _LATER:
                continue
            raise damaged(path, f"{name} is missing")
        if problem := type_problem(holder[key], kind, name):
            raise damaged(path, problem)
    if extra := sorted({f"loop.{k}" for k in ckpt["loop"]} - fields.keys()):
        raise damaged(path, f"{extra[0]} is no part of the training loop's state")
    for name in _COUNTS:
        holder, key = _holder(ckpt, name)
        if holder.get(key, 0) < 0:
            raise damaged(path, f"{name} is {holder[key]}, below 0")


def _holder(ckpt: dict[str, Any], name: str) -> tuple[Any, str]:
    """(the dict that holds dotted field `name`, or None where a dict on the way is absent or
    None; the field's key)."""
    *parents, key = name.split(".")
    holder: Any = ckpt
    for parent in parents:
        holder = holder.get(parent) if isinstance(holder, dict) else None
    return holder, key


def type_problem(value: Any, kind: Any, name: str) -> str | None:
    """Why `value` is not of type `kind` (a class, X | Y, list[X] or dict[K, V]), with its
    name; None if it is. An int is a float here; a bool is not an int."""
    if isinstance(kind, types.UnionType):
        options = typing.get_args(kind)
        if any(type_problem(value, option, name) is None for option in options):
            return None
        return f"{name} is {_a(value)}, not {' or '.join(map(_a_kind, options))}"
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if (not isinstance(value, (int, float) if kind is float else origin)
            or (isinstance(value, bool) and kind is not bool)):
        return f"{name} is {_a(value)}, not {_a_kind(kind)}"
    if not args:
        return None
    items = enumerate(value) if origin is list else value.items()  # list[X], dict[K, X]
    return next((problem for i, item in items
                 if (problem := type_problem(item, args[-1], f"{name}[{i!r}]"))), None)


def _a(value: Any) -> str:
    return "None" if value is None else _a_kind(type(value))


def _a_kind(kind: Any) -> str:
    """A type as a message names it: an int, a tensor, a list, None."""
    if kind is type(None):
        return "None"
    name = "tensor" if kind is torch.Tensor else (typing.get_origin(kind) or kind).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _misfit(ckpt: dict[str, Any], run: ResumeTarget) -> str | None:
    """What of a checkpoint does not fit the run as built: a model's weights, the optimiser's,
    schedule's or loss scaler's state, the random state, or where the loop was. None if all
    fits."""
    fresh = run.fresh
    for key in ("model", "train_model", "lookahead"):
        if key not in fresh:
            continue
        if key not in ckpt:  # train_model (--ema) or lookahead
            return f"{key} is missing, though the run's config asks for it"
        if problem := (type_problem(ckpt[key], dict[str, torch.Tensor], key)
                       or _unlike(ckpt[key], fresh[key], key, same_keys=True)):
            return problem
    loop, n = ckpt["loop"], run.images
    # (saved, as this run builds it, name); a scaler only where both have one: another GPU
    # may choose another precision for --precision auto
    pieces = [(ckpt["scheduler"], fresh["scheduler"], "scheduler"),
              *((ckpt["rng"][key], value, f"rng.{key}") for key, value in fresh["rng"].items()),
              (loop["window"], torch.zeros(2, dtype=torch.float64), "loop.window"),
              (loop.get("window_correct"), torch.zeros((), dtype=torch.float64),
               "loop.window_correct"),
              (loop["order"], torch.arange(n), "loop.order"),
              (ckpt["scaler"], fresh["scaler"], "scaler")]
    problem = _optimizer_misfit(ckpt["optimizer"], fresh["optimizer"], run.parameter_shapes
                                ) or next(
        (problem for saved, new, name in pieces if saved is not None and new is not None
         and (problem := _unlike(saved, new, name))), None)
    if problem:
        return problem
    if loop["order"] is not None and not torch.equal(loop["order"].sort().values,
                                                     torch.arange(n)):
        return f"loop.order is not an order of the {n} training images"
    if ckpt["batch"] > run.batches:
        return f"batch is {ckpt['batch']}, past the {run.batches} batches of an epoch"
    if ckpt["step"] > run.total_steps:
        return f"step is {ckpt['step']}, past the run's {run.total_steps} steps"
    return None


def _optimizer_misfit(saved: dict[str, Any], fresh: dict[str, Any],
                      shapes: list[torch.Size]) -> str | None:
    """How an optimiser state does not fit `fresh` (the state of the optimiser as built, of
    parameters of `shapes` in its order): its parameter groups (their sizes and settings), or
    a parameter's state (of no parameter, or of another shape)."""
    if problem := _unlike(saved["param_groups"], fresh["param_groups"],
                          "optimizer.param_groups"):
        return problem
    params = dict(zip(chain.from_iterable(g["params"] for g in saved["param_groups"]), shapes))
    for index, state in saved["state"].items():
        name = f"optimizer.state[{index!r}]"
        if index not in params:
            return f"{name} is the state of no parameter"
        if problem := type_problem(state, dict[str, torch.Tensor | float | None], name):
            return problem
        shape = params[index]
        for key, value in state.items():  # per parameter, or a scalar (Adam's step)
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != shape:
                return f"{name}.{key} has shape {list(value.shape)}, not {list(shape)}"
    return None


# What a value of this run's own state may be matched by (bool first: a bool is an int)
_ALIKE = ((bool, bool), ((int, float), int | float), (dict, dict), ((list, tuple), list | tuple))


def _unlike(saved: Any, fresh: Any, name: str, same_keys: bool = False) -> str | None:
    """How `saved` differs from `fresh`, the same piece of state as this run builds it: a
    tensor's shape or dtype, a list's length, a value's type (numbers are alike); None if it
    does not. Of dicts, the keys both have are compared - torch adds and drops keys of its
    schedulers' and optimisers' states between versions - unless `same_keys`."""
    if isinstance(fresh, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"{name} is {_a(saved)}, not a tensor"
        differ = [*([f"shape {list(saved.shape)}, not {list(fresh.shape)}"]
                    if saved.shape != fresh.shape else []),
                  *([f"dtype {saved.dtype}, not {fresh.dtype}"]
                    if saved.dtype != fresh.dtype else [])]
        return f"{name} has {' and '.join(differ)}" if differ else None
    kind = next((kind for types_, kind in _ALIKE if isinstance(fresh, types_)), type(fresh))
    if problem := type_problem(saved, kind, name):
        return problem
    if isinstance(fresh, dict):
        if same_keys and saved.keys() != fresh.keys():
            key = next(k for k in (*fresh, *saved) if k not in saved or k not in fresh)
            return f"{name}[{key!r}] is {'missing' if key in fresh else 'not in this run'}"
        pairs = [(f"{name}[{k!r}]", saved[k], fresh[k]) for k in fresh if k in saved]
    elif isinstance(fresh, (list, tuple)):
        if len(saved) != len(fresh):
            return f"{name} holds {len(saved)} items, not {len(fresh)}"
        pairs = [(f"{name}[{i}]", s, f) for i, (s, f) in enumerate(zip(saved, fresh))]
    else:
        return None
    return next((problem for key, s, f in pairs if (problem := _unlike(s, f, key))), None)
