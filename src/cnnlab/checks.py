"""Turning text and files into typed option values, and refusing impossible ones: each
refusal one line naming the option and the fix, before any data is read."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from .errors import CnnlabError, did_you_mean, unknown_choice
from .models import code, entry, hub_of, is_code, options_of
from .options import ARGUMENT, OPTIONS, Config, field_name, format_value, option_name
from .presets import flips
from .specs import SPECS

# Other names users give options, for "did you mean" (difflib finds the mistypings)
_SYNONYMS = {"learning_rate": "lr", "learningrate": "lr", "max_lr": "lr", "epoch": "epochs",
             "num_epochs": "epochs", "max_epochs": "epochs", "bs": "batch_size",
             "batch": "batch_size", "wd": "weight_decay", "optim": "optimizer",
             "scheduler": "schedule", "lr_schedule": "schedule", "smoothing": "label_smoothing",
             "pooling": "pool", "augmentation": "augment", "augmentations": "augment",
             "amp": "precision", "dtype": "precision", "validation_split": "val_split"}


def nearest_option(key: str, names: list[str] | None = None) -> str:
    """'; did you mean lr?' for a key that is no option (among `names`, default all train
    options): a common other name for one, or the nearest spelling; else ''."""
    name = field_name(key)
    names = names or [option_name(k) for k, o in OPTIONS.items() if o.kind != ARGUMENT]
    if name in _SYNONYMS and option_name(_SYNONYMS[name]) in names:
        return f"; did you mean {option_name(_SYNONYMS[name])}?"
    return did_you_mean(option_name(name), names)


def unknown_option(key: str, where: str) -> CnnlabError:
    """The error for an option name that is none, spelled as the user wrote it."""
    return CnnlabError(f"unknown {where} '{key}'{nearest_option(key)} (see 'cnnlab train "
                       "--help')")


def option_values(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """`raw` (a config file's or [train] table's keys and values) with field names as keys;
    a key that is no option is refused as the file spells it."""
    values = {}
    for key, value in raw.items():
        name = field_name(key)
        if name not in OPTIONS or OPTIONS[name].kind == ARGUMENT:
            raise unknown_option(key, where)
        values[name] = value
    return values


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config with the options an earlier version did not write (it had no
    such option) at their defaults, which is what that version did."""
    return {**{name: o.default for name, o in OPTIONS.items()
               if o.default is not dataclasses.MISSING}, **saved}


class Damaged(ValueError):
    """What is wrong with a field of a saved run (missing, of the wrong type or out of range);
    the caller names the file and what to do about it."""


def config_fields(saved: object, prefix: str = "") -> dict[str, Any]:
    """The Config fields of a run's saved configuration (a checkpoint's, or config.json's,
    whose other keys - what ran, under "resolved" - are left out), those an earlier version
    did not write at their defaults. Raises Damaged naming a field (`prefix` + its name)
    that is missing or of the wrong type."""
    from .checkpoint import type_problem

    if not isinstance(saved, dict):
        raise Damaged(type_problem(saved, dict, prefix.rstrip(".") or "it"))
    values = with_defaults(saved)
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    for name, o in OPTIONS.items():
        if name not in values:
            raise Damaged(f"{prefix}{name} is missing")
        kind = kinds[o.type] | None if o.nullable else kinds[o.type]
        if problem := type_problem(values[name], kind, prefix + name):
            raise Damaged(problem)
    return {name: values[name] for name in OPTIONS}


def typed_value(key: str, value: Any, *, what: str | None = None, text: bool = False) -> Any:
    """`value` (a TOML or Python value; with `text`, also command-line text) as the type of
    Config.`key`: int, float, bool (from text also true/false, yes/no, 1/0, on/off) or str;
    None where the field allows it. A string where a number or a bool is expected is refused
    unless `text`: `lr = "0.05"` in a file is a mistake, not a number. Raises CnnlabError
    `<what>: <value> is not a <type>` (what: e.g. "grid lr"), or without `what`, `<option>
    must be <type>, got <value>`."""
    kind = OPTIONS[key].type
    if what:
        bad = CnnlabError(f"{what}: {short(value)} is not {'an' if kind == 'int' else 'a'} "
                          f"{kind}")
    else:
        bad = CnnlabError(f"{option_name(key)} must be {kind}, got {short(value)}")
    if value is None:
        if OPTIONS[key].nullable:
            return None
        raise bad
    if isinstance(value, str) and kind != "str" and not text:
        typed_value(key, value, what=what, text=True)  # not even text of one: `bad`
        raise CnnlabError(f"{what or option_name(key)}: {value!r} is text, not "
                          f"{'an' if kind == 'int' else 'a'} {kind}; write it without quotes")
    if isinstance(value, bool) and kind != "bool":
        raise bad
    result = _TYPED[kind](key, value.strip() if isinstance(value, str) else value)
    if result is _NOT:
        raise bad
    return result


_NOT = object()  # what a _TYPED function returns for a value that is none of its type


def _bool(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return _NOT


def _str(key: str, value: Any) -> Any:
    return str(value)


def _number(key: str, value: Any) -> Any:
    """An int or float option's value (bools refused before): an integer exact however large
    (the range check says what is wrong), whole epochs as an int (2, not 2.0)."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value):
        value = int(value)
    if isinstance(value, int):
        return value if OPTIONS[key].type == "int" or key == "epochs" else _float(key, value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return _NOT
    if OPTIONS[key].type == "int":
        return int(number) if number.is_integer() else _NOT
    if key == "epochs" and number.is_integer() and abs(number) < 2**53:
        return int(number)
    return number


# The value of an option of each type, from a TOML, Python or command-line value
_TYPED = {"bool": _bool, "str": _str, "int": _number, "float": _number}


def _float(key: str, number: int) -> float:
    try:
        return float(number)
    except OverflowError:
        raise CnnlabError(f"--{option_name(key)} must be a finite number, got "
                          f"{short(number)}") from None


def short(value: Any) -> str:
    """A value for a message (text quoted): a number of hundreds of digits as its first ones
    and its length, other long text cut."""
    text = value.strip() if isinstance(value, str) else format_value(value)
    if len(text) > 24 and text.lstrip("+-").isdigit():
        text = f"{text[:6]}...({len(text.lstrip('+-'))} digits)"
    elif len(text) > 60:
        text = text[:57] + "..."
    return repr(text) if isinstance(value, str) else text


def _check_model(cfg: Config) -> None:
    """The model's name and what only some models take: --model-arg, --pretrained."""
    hub = hub_of(cfg.model)
    if hub or is_code(cfg.model):
        code.parse_args(cfg.model_args)
    else:
        entry(cfg.model)
        if cfg.model_args:
            raise CnnlabError(f"--model-arg is for your own, torchvision's and timm's models; "
                              f"{cfg.model}'s options are flags (cnnlab models lists them)")
    if cfg.pretrained and not hub:
        raise CnnlabError(f"--pretrained loads the published weights of torchvision:NAME and "
                          f"timm:NAME models; {cfg.model} has none")


def validate(cfg: Config) -> None:
    """Reject impossible values with a message naming the option and the fix (before any
    data is read, so that a sweep fails before its first run)."""


    _check_model(cfg)
    if cfg.dataset not in SPECS and not cfg.dataset.startswith(("folder:", "python:")):
        raise CnnlabError(unknown_choice("dataset", cfg.dataset, [*SPECS, "folder:PATH"]))
    if cfg.pool is not None and "pool" not in options_of(cfg.model):
        raise CnnlabError(f"model {cfg.model} has no option 'pool'")
    for name in OPTIONS:
        check_option(name, getattr(cfg, name))
    if cfg.image_size is not None:
        parse_image_size(cfg.image_size)
        if not cfg.dataset.startswith("folder:"):
            raise CnnlabError(f"--image-size resizes the images of folder datasets; "
                              f"{cfg.dataset}'s images come in one size already")
    if "resized-crop" in cfg.augment and (cfg.image_size is None
                                          or not cfg.dataset.startswith("folder:")):
        raise CnnlabError("--augment resized-crop cuts its crops from full-resolution photos, "
                          "decoded each epoch: it needs a folder: dataset and the --image-size "
                          "to train at (e.g. 224)" + ("" if cfg.dataset.startswith("folder:")
                                                      else f"; for {cfg.dataset} use crop"))
    if not 0 <= cfg.val_split < 1:
        raise CnnlabError(f"--val-split must be a fraction in [0, 1), e.g. 0.1, got "
                          f"{cfg.val_split}")
    if not 0 <= cfg.label_smoothing < 1:
        raise CnnlabError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.tta != "none" and not flips(cfg.augment):
        raise CnnlabError(f"--tta {cfg.tta} needs a model trained with flips (--augment "
                          f"crop,flip, flip or altflip), not --augment {cfg.augment}; mirrored "
                          "images would be new to it")
    if not 0 <= cfg.ema < 1:
        raise CnnlabError(f"--ema must be a decay in [0, 1) (0 = off, e.g. 0.999), got {cfg.ema}")
    checkpoint_interval(cfg.checkpoint_every)
    if cfg.optimizer == "muon":
        import torch

        if not hasattr(torch.optim, "Muon"):
            raise CnnlabError(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this "
                              f"is torch {torch.__version__}")
    if cfg.cuda_graph:
        _graphable(cfg)


def check_option(name: str, value: Any, spelled: str | None = None) -> None:
    """Refuse a value of option `name` that is not finite, out of its range or none of its
    choices, naming the option as the command spells it (`spelled`, default the option's
    own name). None (not given, or the field's own None) passes."""
    o, spelled = OPTIONS[name], spelled or option_name(name)
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise CnnlabError(f"--{spelled} must be a finite number, got {value}")
    if o.limits and (problem := o.limits.problem(value)):
        raise CnnlabError(f"--{spelled} must be {problem}, got {short(value)}")
    if o.choices and value not in o.choices:
        raise CnnlabError(unknown_choice(spelled, value, o.choices))


def _graphable(cfg: Config) -> None:
    """What --cuda-graph cannot capture (the device and the process count are checked where
    they are known: the trainer)."""
    conflict = ("--compile" if cfg.compile else "--detect-anomaly" if cfg.detect_anomaly
                else "--precision fp16" if cfg.precision == "fp16" else None)
    if conflict:
        why = {"--compile": "choose one of them",
               "--detect-anomaly": "anomaly checks read values back to the host in every step",
               "--precision fp16": "its loss scaling decides on the host; use bf16 or fp32"}
        raise CnnlabError(f"--cuda-graph does not work with {conflict}: {why[conflict]}")
    if "resized-crop" in cfg.augment and cfg.skip_bad_files:
        raise CnnlabError("--cuda-graph with --skip-bad-files: a photo found unreadable "
                          "mid-epoch makes its batch smaller, which a captured step cannot "
                          "take; fix the files, or leave out one of them")
    if cfg.optimizer not in ("sgd", "adam", "adamw") or not cfg.fused:
        raise CnnlabError(f"--cuda-graph needs a fused optimiser step: sgd, adam or adamw with "
                          f"--fused, not --optimizer {cfg.optimizer}"
                          f"{'' if cfg.fused else ' --no-fused'}")


def parse_image_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '64x48' -> (64, 48): (height, width) in pixels."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m or not all(0 < int(n) <= IMAGE_SIZE_MAX for n in m.groups() if n is not None):
        raise CnnlabError(f"--image-size must be N or HxW in pixels, each 1 to "
                          f"{IMAGE_SIZE_MAX:,} (e.g. 64 or 64x48), got {short(text)}")
    height = int(m.group(1))
    return height, int(m.group(2) or height)


IMAGE_SIZE_MAX = 8192  # pixels a side


def checkpoint_interval(text: str) -> tuple[int, str]:
    """'500' or '500steps' -> (500, 'step'); '2epochs', '2e' -> (2, 'epoch')."""
    m = re.fullmatch(r"\s*(\d+)\s*(steps?|s|epochs?|e)?\s*", str(text))
    if not m or not 0 < int(m.group(1)) <= 10**9:
        raise CnnlabError(f"--checkpoint-every must be N steps or N epochs, N from 1 to 10^9 "
                          f"(e.g. 500 or 1epoch), got {short(text)}")
    unit = "epoch" if (m.group(2) or "s").startswith("e") else "step"
    return int(m.group(1)), unit
