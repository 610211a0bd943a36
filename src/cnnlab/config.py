"""Typed run configuration: presets, TOML files and CLI overrides, resolved and validated.

Precedence: command line > config file > preset. Everything a run did is in `Config`,
which is written to the run directory and travels inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CnnlabError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

OPTIMIZERS = ("sgd", "adam", "adamw", "adamax")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
AUGMENTS = ("none", "crop", "flip", "crop,flip")
PRESETS = ("fast", "seed")
POOLS = ("max", "avg")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTAS = ("none", "flip")
# Options a resumed run may change: they do not alter what is computed.
RESUME_SAFE = ("epochs", "log_every", "checkpoint_every", "device", "data_dir", "download",
               "telemetry", "tensorboard", "detect_anomaly", "compile")


@dataclass(frozen=True)
class Config:
    model: str
    dataset: str
    preset: str = "fast"
    epochs: int = 3
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    label_smoothing: float = 0.0
    augment: str = "none"
    normalize: bool = True
    pool: str | None = None
    seed: int = 0
    device: str = "auto"
    log_every: int = 100
    eval_batch_size: int = 1000
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    fused: bool = True
    ema: float = 0.0
    tta: str = "none"
    checkpoint_every: str = "1epoch"
    deterministic: bool = False
    detect_anomaly: bool = False
    skip_bad_files: bool = False
    sync_bn: bool = False
    telemetry: float = 1.0
    tensorboard: bool = False
    data_dir: str = ""
    download: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# The report's recipe (SEED.md): ToTensor only, batch 64, SGD momentum 0.9, constant lr.
_SEED = dict(batch_size=64, optimizer="sgd", momentum=0.9, nesterov=False, weight_decay=0.0,
             schedule="constant", label_smoothing=0.0, augment="none", normalize=False)
_SEED_LR_EPOCHS = {"mnist": (0.001, 64), "fashion-mnist": (0.001, 64), "cifar10": (0.01, 30)}

# The shortest way to a good model. LeNet-5 / MNIST: >= 98.8% after one epoch and >= 99.0%
# after two on a 2-core CPU (benchmarks/RESULTS.md). ResNet-18: a modern short GPU recipe.
_FAST = {
    "lenet5": dict(epochs=2, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9,
                   nesterov=True, weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1),
    "resnet18": dict(epochs=20, batch_size=512, optimizer="sgd", lr=0.2, momentum=0.9,
                     nesterov=True, weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1),
    # fastnet (airbench-like): short, large-batch, strong label smoothing.
    "fastnet": dict(epochs=10, batch_size=512, optimizer="sgd", lr=0.2, momentum=0.9,
                    nesterov=True, weight_decay=5e-4, schedule="onecycle", label_smoothing=0.2),
}


def flips(augment: str) -> bool:
    """Whether an --augment value mirrors images."""
    return "flip" in augment.split(",")


def preset_values(preset: str, model: str, dataset: str) -> dict[str, Any]:
    """The values a preset gives for this model and dataset."""
    if preset not in PRESETS:
        raise CnnlabError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if preset == "seed":
        lr, epochs = _SEED_LR_EPOCHS.get(dataset, (0.01, 30))
        return dict(_SEED, lr=lr, epochs=epochs)
    values = dict(_FAST.get(model, _FAST["resnet18"]))
    # Crop+flip suits natural images; digits must not be mirrored, and folders opt in.
    values["augment"] = "crop,flip" if dataset == "cifar10" else "none"
    return values


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config file into option values (keys may use '-' or '_')."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise CnnlabError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise CnnlabError(f"config file {p} is not valid TOML: {e}") from None
    return {k.replace("-", "_"): v for k, v in raw.items()}


def resolve(model: str, dataset: str, *, file_values: dict[str, Any] | None = None,
            overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config: preset < file < overrides (None values are ignored)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_values = file_values or {}
    preset = overrides.get("preset") or file_values.get("preset") or "fast"
    values: dict[str, Any] = preset_values(preset, model, dataset)
    for source, name in ((file_values, "config file"), (overrides, "option")):
        for key, value in source.items():
            if key not in FIELDS or key in ("model", "dataset"):
                raise CnnlabError(f"unknown {name} key '{key}'; see 'cnnlab train --help'")
            values[key] = value
    if "tta" not in values:  # the fast preset scores flip-trained models on both mirror images
        with_flips = flips(str(values.get("augment", "")))
        values["tta"] = "flip" if preset == "fast" and with_flips else "none"
    if not values.get("data_dir"):
        values["data_dir"] = os.environ.get("CNNLAB_DATA") or "data"
    cfg = Config(model=model, dataset=dataset, **_coerce(values))
    validate(cfg)
    return cfg


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def typed_value(key: str, value: Any, *, what: str | None = None) -> Any:
    """`value` (text from the command line, a TOML or Python value) as the type of
    Config.`key`: int, float, bool (also from true/false, yes/no, 1/0, on/off) or str; None
    where the field allows it. Raises CnnlabError `<what>: <value> is not a <type>` (what:
    e.g. "grid lr"), or without `what`, `<option> must be <type>, got <value>`."""
    kind = FIELDS[key].type.split(" ")[0]  # "int", "float", "bool", "str" ("str | None")
    if what:
        bad = CnnlabError(f"{what}: {value!r} is not {'an' if kind == 'int' else 'a'} {kind}")
    else:
        bad = CnnlabError(f"{key.replace('_', '-')} must be {kind}, got {value!r}")
    if value is None:
        if "None" in FIELDS[key].type:
            return None
        raise bad
    text = value.strip() if isinstance(value, str) else None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise bad
    if kind == "str":
        if isinstance(value, bool):
            raise bad
        return text if text is not None else str(value)
    if isinstance(value, bool):
        raise bad
    try:
        number = float(text) if text is not None else float(value)
    except (TypeError, ValueError):
        raise bad from None
    if kind == "int":
        if not number.is_integer():
            raise bad
        return int(number)
    return number


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    return {key: typed_value(key, value) for key, value in values.items()}


def _positive(cfg: Config, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise CnnlabError(f"--{name.replace('_', '-')} must be positive, "
                              f"got {getattr(cfg, name)}")


def validate(cfg: Config) -> None:
    """Reject impossible values with a message naming the option and the fix (before any
    data is read, so that a sweep fails before its first run)."""
    import inspect

    from .data.specs import SPECS
    from .models import MODELS

    if cfg.model not in MODELS:
        raise CnnlabError(f"unknown model '{cfg.model}'; choose one of {', '.join(MODELS)}")
    if cfg.dataset not in SPECS and not cfg.dataset.startswith("folder:"):
        raise CnnlabError(f"unknown dataset '{cfg.dataset}'; choose one of "
                          f"{', '.join(SPECS)}, folder:PATH")
    if cfg.pool is not None and "pool" not in inspect.signature(MODELS[cfg.model]).parameters:
        raise CnnlabError(f"model {cfg.model} has no option 'pool'")
    _positive(cfg, "epochs", "batch_size", "lr", "log_every", "eval_batch_size")
    choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "augment": AUGMENTS,
               "precision": PRECISIONS, "tta": TTAS}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise CnnlabError(f"unknown {name} '{getattr(cfg, name)}'; "
                              f"choose one of {', '.join(allowed)}")
    if cfg.pool is not None and cfg.pool not in POOLS:
        raise CnnlabError(f"unknown pool '{cfg.pool}'; choose one of {', '.join(POOLS)}")
    if cfg.momentum < 0 or cfg.weight_decay < 0:
        raise CnnlabError("--momentum and --weight-decay must not be negative")
    if not 0 <= cfg.label_smoothing < 1:
        raise CnnlabError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.tta == "flip" and not flips(cfg.augment):
        raise CnnlabError(f"--tta flip needs a model trained with flips (--augment crop,flip "
                          f"or flip), not --augment {cfg.augment}; mirrored images would be "
                          "new to it")
    if not 0 <= cfg.ema < 1:
        raise CnnlabError(f"--ema must be a decay in [0, 1) (0 = off, e.g. 0.999), got {cfg.ema}")
    if cfg.telemetry < 0:
        raise CnnlabError(f"--telemetry must be seconds >= 0 (0 = off), got {cfg.telemetry}")
    checkpoint_interval(cfg.checkpoint_every)


def checkpoint_interval(text: str) -> tuple[int, str]:
    """'500' or '500steps' -> (500, 'step'); '2epochs', '2e' -> (2, 'epoch')."""
    m = re.fullmatch(r"\s*(\d+)\s*(steps?|s|epochs?|e)?\s*", str(text))
    if not m or int(m.group(1)) <= 0:
        raise CnnlabError(f"--checkpoint-every must be N steps or N epochs (e.g. 500 or 1epoch), "
                          f"got '{text}'")
    unit = "epoch" if (m.group(2) or "s").startswith("e") else "step"
    return int(m.group(1)), unit
