"""Typed run configuration: presets, TOML files and CLI overrides, resolved and validated.

Precedence: command line > config file > preset. Everything a run did is in `Config`,
which is written to the run directory and travels inside every checkpoint.

Each field says once, in its metadata, what everything else needs to know about it: its
help text, its choices, how the command line spells it, and its role - whether it changes
what a run computes. The command-line options, the TOML keys, the validation of choices and
what resumes, sweeps and reports compare are all made from that.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CnnlabError, did_you_mean, unknown_choice

if TYPE_CHECKING:  # torch is imported where a device is resolved: --help stays light
    import torch

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# muon: torch.optim.Muon for the hidden layers' weights, SGD for the rest (optim.MuonSGD)
OPTIMIZERS = ("sgd", "adam", "adamw", "adamax", "muon")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "triangle")
# crop: random crops of the image padded by 4 zero pixels; translate: by up to 2 pixels,
# the border mirrored; flip: a random half of each batch mirrored; altflip: each image
# mirrored every other epoch (a random half in odd epochs, the other half in even ones)
AUGMENTS = ("none", "crop", "flip", "crop,flip", "translate", "altflip", "translate,flip",
            "crop,altflip", "translate,altflip")
PRESETS = ("fast", "seed")
POOLS = ("max", "avg")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTAS = ("none", "flip", "flip,translate")

# Roles: what a field's value means for the result of a run.
IDENTITY = "identity"  # which run it is (model, dataset, seed): named with the run
RECIPE = "recipe"      # how it trains: changes the result; a results table lists it
MACHINE = "machine"    # fits the run to the machine or the data at hand; may change the
#                        result, but a results table does not list it
RUNTIME = "runtime"    # where it runs and what it records: cannot change the result, so a
#                        resumed run may change it and sweeps and reports do not compare it

# How the command line spells a field.
ARGUMENT = "argument"  # a positional argument (MODEL, DATASET), not an option or a TOML key
VALUE = "value"        # --name VALUE
SWITCH = "switch"      # --name / --no-name
ON = "on"              # --name alone
OFF = "off"            # --no-name alone


@dataclass(frozen=True)
class Limits:
    """The values a numeric option may take: from `low` (above 0 where `positive`) to
    `high` (below it where `below`: a fraction under 1); `off`: 0 is allowed too (it switches
    the option off). Ranges keep a typo's huge or tiny number from running for ever, filling
    memory or sampling thousands of times a second."""

    low: float = 0
    high: float = math.inf
    positive: bool = False
    off: bool = False
    below: bool = False

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` ("positive", "at most 10,000", ...), or None."""
        if self.off and value == 0:
            return None
        if self.positive and value <= 0:
            return "positive"
        if value < self.low:
            return f"at least {format_value(self.low)}" + (" (or 0: off)" if self.off else "")
        if value > self.high or (self.below and value == self.high):
            return f"{'below' if self.below else 'at most'} {self.high:,}"
        return None


def option(default: Any = dataclasses.MISSING, *, help: str, role: str = RECIPE,
           choices: tuple[str, ...] = (), kind: str | None = None,
           limits: Limits | None = None, default_text: str | None = None) -> Any:
    """A Config field with its metadata. No default: the preset (or `resolve`) gives the
    value. kind: how the command line spells it (default: SWITCH for bools, else VALUE).
    limits: a number's range (every number must be finite). default_text: how --help states
    a default that is not the field's own value (one `resolve` derives)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "role": role, "choices": choices,
                                       "kind": kind, "limits": limits,
                                       "default_text": default_text})


_MANY = 1 << 20  # 1,048,576: the most images in a batch
_EPOCHS = 10_000  # the most epochs (or evaluations apart) a run may have
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds alike take 0 .. 2^32 - 1


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run does. `resolve` builds it for a new run; a resumed run rebuilds it
    from its checkpoint (`Config(**saved)`)."""

    model: str = option(help="the model", role=IDENTITY, kind=ARGUMENT)
    dataset: str = option(help="the dataset", role=IDENTITY, kind=ARGUMENT)
    preset: str = option("fast", choices=PRESETS,
                         help="fast = the shortest way to a good model, seed = the lab "
                              "report's exact recipe; it gives the options not set otherwise")
    epochs: float = option(help="passes over the training split; a fraction ends the last "
                                "one part-way (e.g. 1.5)",
                           limits=Limits(high=_EPOCHS, positive=True))
    batch_size: int = option(help="images per optimiser step (over all processes)",
                             limits=Limits(high=_MANY, positive=True))
    optimizer: str = option(choices=OPTIMIZERS, help="the optimiser")
    lr: float = option(help="(peak) learning rate", limits=Limits(positive=True))
    momentum: float = option(help="SGD momentum", limits=Limits(high=1))
    nesterov: bool = option(help="Nesterov momentum (sgd)")
    weight_decay: float = option(help="L2 penalty on the weights", limits=Limits())
    muon_lr: float = option(0.24, help="--optimizer muon only: Muon's (peak) learning rate "
                                       "for the hidden layers' weights (convolution "
                                       "filters, linear layers but the head), which the "
                                       "schedule scales as it scales --lr",
                            limits=Limits(positive=True))
    muon_momentum: float = option(0.6, help="--optimizer muon only: Muon's momentum for the "
                                            "hidden layers' weights, in [0, 1)",
                                  limits=Limits(high=1, below=True))
    schedule: str = option(choices=SCHEDULES, help="learning-rate schedule (triangle: from 0.2 x "
                                                   "lr up to lr over the first 23 percent of "
                                                   "steps, then down to 0.07 x lr)")
    norm_lr_scale: float = option(help="batch-norm parameters learn this many times "
                                            "faster, with the same weight decay per step",
                                  limits=Limits(high=_EPOCHS, positive=True))
    lookahead: bool = option(help="every 5 steps pull the weights towards a slow "
                                         "average of them, more strongly as training ends; "
                                         "the run ends on the average")
    label_smoothing: float = option(help="label smoothing of the loss, in [0, 1)")
    augment: str = option(choices=AUGMENTS, help="training batches: crop (4 pixels of zero "
                                                 "padding) or translate (2 pixels, mirrored "
                                                 "border); flip (random) or altflip "
                                                 "(alternating epochs)")
    normalize: bool = option(help="scale images by the dataset's mean and std")
    image_size: str | None = option(None, help="folder datasets: resize each image's shorter "
                                               "side and centre-crop it to N x N or H x W "
                                               "pixels (e.g. 64 or 64x48); kept with the "
                                               "model for predict and export")
    val_split: float = option(0.0, help="hold out this fraction of each class's training "
                                        "images (drawn with --seed) as a validation split, "
                                        "on which best.pt is chosen; 0: none - a folder's "
                                        "val/ is used when it has one, else best.pt is the "
                                        "best on test (optimistic)")
    pool: str | None = option(None, choices=POOLS, help="LeNet-5's pooling (default: the model's)")
    seed: int = option(0, role=IDENTITY, help="random seed (0 to 2^32 - 1)",
                       limits=Limits(high=SEED_MAX))
    device: str = option("auto", role=RUNTIME, help="auto | cpu | cuda | cuda:N",
                         default_text="$CNNLAB_DEVICE, else auto")
    log_every: int = option(100, role=RUNTIME,
                            help="log the mean training loss every N steps",
                            limits=Limits(high=10**9, positive=True))
    eval_batch_size: int = option(1000, role=MACHINE, help="images per evaluation batch",
                                  limits=Limits(high=_MANY, positive=True))
    precision: str = option("auto", choices=PRECISIONS,
                            help="auto: bf16 or fp16 on GPUs; on CPUs with AVX512-BF16 or "
                                 "AMX bf16 for resnet18 and fastnet; else fp32")
    channels_last: bool | None = option(None, help="channels-last memory format (default on)")
    compile: bool = option(False, role=MACHINE, kind=ON,
                           help="torch.compile the model for training (static shapes: the "
                                "last partial batch of an epoch is left out; evaluation runs "
                                "eagerly). Its compilation takes tens of seconds: it pays "
                                "for long GPU runs, not on CPUs or for short runs")
    cuda_graph: bool = option(False, role=MACHINE, kind=ON,
                              help="GPU: record the training step once as a CUDA graph and "
                                   "replay it for every batch - one launch per step, for "
                                   "small models that leave a GPU idle between kernels. "
                                   "Static shapes (the last partial batch of an epoch is "
                                   "left out); sgd, adam or adamw with --fused; fp32 or bf16; "
                                   "one process; not with --compile")
    fused: bool = option(True, help="one fused optimiser kernel for all parameters, with sgd, "
                                    "adam and adamw")
    ema: float = option(0.0, help="evaluate and save an exponential moving average of the "
                                  "weights with this decay per step (e.g. 0.999; 0 = off)")
    tta: str = option(choices=TTAS, help="flip: score each test image and its mirror image; "
                                         "flip,translate: also both shifted by a pixel",
                      default_text="flip where the fast preset trains with flips, "
                                   "else none")
    eval_every: int = option(1, role=RUNTIME, help="evaluate every N epochs (and after the "
                                                   "last); best.pt is chosen among those",
                             limits=Limits(high=_EPOCHS, positive=True))
    checkpoint_every: str = option("1epoch", role=RUNTIME,
                                   help="N steps or N epochs, e.g. 500 or 1epoch")
    deterministic: bool = option(False, kind=ON, help="deterministic algorithms (identical "
                                                      "reruns, slower on GPU)")
    detect_anomaly: bool = option(False, role=RUNTIME, kind=ON,
                                  help="find the operation that produced a NaN (slow)")
    skip_bad_files: bool = option(False, role=MACHINE, kind=ON,
                                  help="folder datasets: skip unreadable images instead of "
                                       "stopping")
    sync_bn: bool = option(False, role=MACHINE, kind=ON,
                           help="under torchrun: batch-norm statistics over all ranks")
    threads: int | None = option(None, role=RUNTIME,
                                 help="CPU threads a process trains with",
                                 default_text="$OMP_NUM_THREADS, else the CPUs this process "
                                              "may use (affinity, cgroup quota)",
                                 limits=Limits(low=1, high=1024))
    telemetry: float = option(1.0, role=RUNTIME,
                              help="seconds between utilisation samples, 0.01 to 3600 (0 = "
                                   "off)",
                              limits=Limits(low=0.01, high=3600, off=True))
    tensorboard: bool = option(False, role=RUNTIME, kind=ON,
                               help="also write TensorBoard event files")
    data_dir: str = option(role=RUNTIME, help="data root in torchvision's layout",
                           default_text="$CNNLAB_DATA, else ./data")
    download: bool = option(True, role=RUNTIME, kind=OFF,
                            help="fail instead of downloading missing data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Option:
    """One Config field as the command line, TOML files, validation and reports see it."""

    name: str
    type: str                 # "int", "float", "bool" or "str"
    nullable: bool            # None is a value: the model's or the trainer's own default
    default: Any              # dataclasses.MISSING: the preset or `resolve` gives it
    help: str
    role: str
    choices: tuple[str, ...]
    kind: str                 # ARGUMENT, VALUE, SWITCH, ON or OFF
    limits: Limits | None     # a number's range
    default_text: str | None  # how --help states a default `resolve` derives


def _option(f: dataclasses.Field) -> Option:
    type_ = str(f.type).split(" ")[0]  # "str | None" -> "str"
    kind = f.metadata["kind"] or (SWITCH if type_ == "bool" else VALUE)
    return Option(f.name, type_, "None" in str(f.type), f.default, f.metadata["help"],
                  f.metadata["role"], f.metadata["choices"], kind, f.metadata["limits"],
                  f.metadata["default_text"])


OPTIONS: dict[str, Option] = {f.name: _option(f) for f in dataclasses.fields(Config)}


def with_role(*roles: str) -> tuple[str, ...]:
    """The names of the fields that have one of `roles`, in field order."""
    return tuple(name for name, o in OPTIONS.items() if o.role in roles)


# Fields whose values make two runs different runs (a sweep's finished run must match them;
# a report compares them).
COMPARED = with_role(IDENTITY, RECIPE, MACHINE)
# Fields a results table lists as its settings.
LISTED = with_role(RECIPE)
# Fields that mean something only where another field has one value: field -> (that field,
# the value). A results table does not list them for runs where they mean nothing.
ONLY_WITH = {"muon_lr": ("optimizer", "muon"), "muon_momentum": ("optimizer", "muon")}


def applies(config: dict[str, Any], key: str) -> bool:
    """Whether field `key` means something for a run of `config` (a Config's dict)."""
    other, value = ONLY_WITH.get(key, (None, None))
    return other is None or config.get(other) == value


# Options a resumed run may change: those that cannot change the result, and the epochs
# (the trainer allows only more, and only with the constant schedule).
RESUME_SAFE = (*with_role(RUNTIME), "epochs")


def format_value(value: Any) -> str:
    """An option value as the command line writes it: true, 0.001, none."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return "none" if value is None else str(value)


def number(text: str) -> int | float:
    """Command-line text of a number: an int where it is one, however large (so that a
    range check can quote it), else a float."""
    return int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else float(text)


def option_name(name: str) -> str:
    """A field's name as an option and in messages: batch_size -> batch-size."""
    return name.replace("_", "-")


def field_name(key: str) -> str:
    """An option or TOML key with '-' or '_' -> the field name it means (if any)."""
    return str(key).strip().replace("-", "_")


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
    "fastnet": dict(epochs=10, batch_size=1024, lr=1.5, momentum=0.85, weight_decay=0.002 / 1.5,
                    schedule="triangle", label_smoothing=0.2, norm_lr_scale=64.0,
                    lookahead=True),
}
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
    values = dict(_FAST_RECIPE, **_FAST_BY_MODEL.get(model, _FAST_BY_MODEL["resnet18"]),
                  augment=augment)
    if optimizer == "muon":
        values.update(_FAST_MUON, **_FAST_MUON_BY_MODEL.get(model, {}))
    return values


def default_device(value: str | None = None) -> str:
    """The device to use: `value`, else $CNNLAB_DEVICE, else auto."""
    return value or os.environ.get("CNNLAB_DEVICE") or "auto"


def default_data_dir(value: str | os.PathLike | None = None) -> str:
    """The data root as an absolute path: `value`, else $CNNLAB_DATA, else ./data."""
    return os.path.abspath(value or os.environ.get("CNNLAB_DATA") or "data")


def data_dir_for(given: str | os.PathLike | None, trained: dict[str, Any]) -> str:
    """The data root of a command that uses a trained model: `given` (its --data-dir), else
    the one the model was trained on (`trained`: its saved config), else the default."""
    return default_data_dir(given or trained.get("data_dir"))


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


CONFIG_FILE_MAX = 1 << 20  # bytes: a configuration or sweep file is far smaller


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file, its keys as the file spells them (option_values makes them field
    names, so that a message can quote a wrong key as it is written)."""
    p = Path(path)
    try:
        if p.exists() and not p.is_file() and not p.is_dir():  # a device, a FIFO: never opened
            raise CnnlabError(f"config file {p} is not a regular file; give a TOML file")
        with p.open("rb") as f:
            text = f.read(CONFIG_FILE_MAX + 1)
        if len(text) > CONFIG_FILE_MAX:
            raise CnnlabError(f"config file {p} is larger than a configuration can be (at most "
                              f"{CONFIG_FILE_MAX:,} bytes); give the right file")
        raw = tomllib.loads(text.decode())
    except FileNotFoundError:
        raise CnnlabError(f"config file not found: {p}") from None
    except OSError as e:  # a folder, a path through a file, no permission
        raise CnnlabError(f"cannot read config file {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CnnlabError(f"config file {p} is not valid TOML: {e}") from None
    return raw


def resolve(model: str, dataset: str, *, file_values: dict[str, Any] | None = None,
            overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config for a new run: preset < file < overrides (None values are
    ignored). Keys are field names, or option names ('-' for '_'). Overrides may be text
    (as from a command line); a file's numbers must be numbers."""
    overrides = option_values({k: v for k, v in (overrides or {}).items() if v is not None},
                              "option")
    file_values = option_values(file_values or {}, "config file key")
    preset = overrides.get("preset") or file_values.get("preset") or OPTIONS["preset"].default
    optimizer = next((typed_value("optimizer", source["optimizer"], text=source is overrides)
                      for source in (overrides, file_values) if "optimizer" in source), None)
    values: dict[str, Any] = preset_values(preset, model, dataset, optimizer)
    for source in (file_values, overrides):  # a file's values are typed; options may be text
        for key, value in source.items():
            values[key] = typed_value(key, value, text=source is overrides)
    if "tta" not in values:  # the fast preset scores flip-trained models on both mirror images
        values["tta"] = _fast_tta(values["augment"]) if preset == "fast" else "none"
    values["data_dir"] = default_data_dir(values.get("data_dir"))
    values["device"] = default_device(values.get("device"))
    cfg = Config(model=model, dataset=dataset, **values)
    validate(cfg)
    return cfg


def _fast_tta(augment: str) -> str:
    """The fast preset's test-time averaging for a model trained with `augment`."""
    if not flips(augment):
        return "none"
    return "flip,translate" if "translate" in augment.split(",") else "flip"


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
    text_value = value.strip() if isinstance(value, str) else None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text_value is not None and text_value.lower() in _TRUE + _FALSE:
            return text_value.lower() in _TRUE
        raise bad
    if kind == "str":
        if isinstance(value, bool):
            raise bad
        return text_value if text_value is not None else str(value)
    if isinstance(value, bool):
        raise bad
    if text_value is not None and re.fullmatch(r"[+-]?\d+", text_value):
        value = int(text_value)
    if isinstance(value, int):  # exact, however large: the range check says what is wrong
        return value if kind == "int" or key == "epochs" else _float(key, value)
    try:
        number = float(text_value) if text_value is not None else float(value)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if kind == "int":
        if not number.is_integer():
            raise bad
        return int(number)
    if key == "epochs" and number.is_integer() and abs(number) < 2**53:
        return int(number)  # whole epochs are written as they are given: 2, not 2.0
    return number


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


def validate(cfg: Config) -> None:
    """Reject impossible values with a message naming the option and the fix (before any
    data is read, so that a sweep fails before its first run)."""

    from .models import MODELS, options_of
    from .specs import SPECS

    if cfg.model not in MODELS:
        raise CnnlabError(unknown_choice("model", cfg.model, MODELS))
    if cfg.dataset not in SPECS and not cfg.dataset.startswith("folder:"):
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


# ---------------------------------------------------------------- what a run uses and records

def resolve_device(spec: str | None = None) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`; None: the default
    device ($CNNLAB_DEVICE, else auto)."""
    import torch

    spec = default_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise CnnlabError(f"bad device '{spec}'; use auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise CnnlabError(f"--device {spec}: no CUDA GPU is available here; "
                              "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CnnlabError(f"--device {spec}: this machine has {count} GPU(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return device
    raise CnnlabError(f"unknown device '{spec}'; use auto, cpu, cuda or cuda:N")


# Models whose CPU training bf16 speeds up where the CPU computes it natively: ResNet-18
# 2.6x on AVX512-BF16/AMX (benchmarks/RESULTS.md); LeNet-5's tiny convolutions gain nothing.
_CPU_BF16_MODELS = frozenset({"resnet18", "fastnet"})


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated, and slower than fp32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch >= 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device, model: str = "") -> str:
    """`auto`: bf16 on GPUs that have it, else fp16 on GPUs; on CPUs bf16 for the models it
    speeds up where the CPU has native bf16, else fp32."""
    import torch

    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise CnnlabError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if model in _CPU_BF16_MODELS and cpu_has_bf16() else "fp32"


def run_config(cfg: Config, device: torch.device | str, precision: str,
               world_size: int, channels_last: bool) -> dict[str, Any]:
    """A run's config.json: every option as asked (device "auto", precision "auto", ...),
    and under "resolved" what ran: the device, the precision, the number of processes and
    the memory format.
    (Earlier versions wrote the device that ran as "device", and "precision_used" and
    "world_size" beside the options.)"""
    return cfg.to_dict() | {"resolved": {"device": str(device), "precision": precision,
                                         "world_size": world_size,
                                         "channels_last": channels_last}}


@dataclass(frozen=True)
class Resume:
    """A run directory to continue: from its checkpoint, or from the start when the run
    stopped before it wrote one."""

    checkpoint: dict | None


def resume_config(run_dir: str | Path, overrides: dict, *, model: str | None = None,
                  dataset: str | None = None, file_values: dict | None = None,
                  out: str | Path | None = None) -> tuple[Config, Resume]:
    """The run's own configuration, with only the changes that are safe to make, and where
    to continue from. What a resumed run cannot honour - another model, dataset or --out,
    options that would change the result - is refused, whether given as options, as
    `file_values` (a --config file) or as arguments."""
    from . import checkpoint
    from .runs import RunDir

    path = Path(run_dir)
    if out is not None and Path(out).resolve() != path.resolve():
        raise CnnlabError(f"--out {out} differs from the run being resumed ({run_dir}); a "
                          "resumed run stays in its directory (drop --out)")
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a run directory"
        within = (f" (the run directory is {path.parent})"
                  if path.exists() and (path.parent / "config.json").is_file() else "")
        raise CnnlabError(f"nothing to resume at {run_dir}: it {what}{within}")
    if (path / "checkpoint.pt").is_file():
        ckpt = checkpoint.load_for_resume(path)
        try:
            saved, epochs_done = config_fields(ckpt["config"], "config."), ckpt["epoch"]
        except Damaged as e:
            raise checkpoint.damaged(path / "checkpoint.pt", str(e)) from None
        RunDir.check_metrics(path, ckpt["metrics_offset"])  # before anything is written
    elif (path / "config.json").is_file():  # stopped before its first checkpoint
        saved, epochs_done, ckpt = _saved_config(path), 0, None
    else:
        raise CnnlabError(f"nothing to resume in {run_dir}: it holds no run (no config.json "
                          "or checkpoint.pt)")
    given = {"model": model, "dataset": dataset}
    values = dict(saved)
    options = {k: v for k, v in overrides.items() if v is not None}  # beat the file's
    for key, value in {**given, **(file_values or {}), **options}.items():
        if key == "data_dir" and value is not None:
            value = default_data_dir(value)  # stored absolute, as a new run's
        if value is None or value == saved.get(key):
            continue
        if key not in RESUME_SAFE:
            what = key.upper() if key in given else f"--{option_name(key)}"
            raise CnnlabError(f"{what} {value} differs from the run's {saved.get(key)}; a "
                              "resumed run keeps its configuration (start a new run to "
                              "change it)")
        if key == "epochs" and (value < epochs_done or saved["schedule"] != "constant"
                                or not float(saved["epochs"]).is_integer()):
            raise CnnlabError(f"--epochs {value}: a resumed run may only add epochs, and only "
                              f"with the constant schedule after whole epochs (this run's "
                              f"schedule, '{saved['schedule']}', was laid out for "
                              f"{saved['epochs']})")
        values[key] = typed_value(key, value)  # as resolve() types a new run's options
    cfg = Config(**values)
    validate(cfg)
    if epochs_done >= cfg.epochs and (path / "summary.json").is_file():
        raise CnnlabError(f"{run_dir} already finished its {cfg.epochs} epochs; pass --epochs N "
                          "to train more (constant schedule only) or start a new run")
    return cfg, Resume(ckpt)


def _saved_config(path: Path) -> dict[str, Any]:
    """The Config fields of a run directory's config.json (the device as asked; an earlier
    version's config.json holds the device that ran)."""
    from .files import read_json

    file = path / "config.json"
    try:
        return config_fields(read_json(file))
    except (OSError, ValueError) as e:  # unreadable, not JSON, or a field missing or mistyped
        why = f" ({e})" if isinstance(e, Damaged) else ""
        raise CnnlabError(f"{file} is damaged{why}; this run cannot be resumed - start a new "
                          "one") from None
