"""The options of a run: every `Config` field with its metadata - help text, choices,
range, how the command line spells it and its role (whether it changes what a run computes).

Each field says this once; the command-line options, the TOML keys, the validation of
choices and what resumes, sweeps and reports compare are all made from it."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .models import hub_of, is_code

# muon: torch.optim.Muon for the hidden layers' weights, SGD for the rest (optim.MuonSGD)
OPTIMIZERS = ("sgd", "adam", "adamw", "adamax", "muon")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "triangle")
# crop: random crops of the image padded by 4 zero pixels; translate: by up to 2 pixels,
# the border mirrored; flip: a random half of each batch mirrored; altflip: each image
# mirrored every other epoch (a random half in odd epochs, the other half in even ones);
# resized-crop: a random 8-100% of a full-resolution photo resized to --image-size (folders)
AUGMENTS = ("none", "crop", "flip", "crop,flip", "translate", "altflip", "translate,flip",
            "crop,altflip", "translate,altflip", "resized-crop", "resized-crop,flip",
            "resized-crop,altflip")
PRESETS = ("fast", "seed")
POOLS = ("max", "avg")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IN_MEMORY = ("auto", "yes", "no")
TTAS = ("none", "flip", "flip,translate")

# Roles: what a field's value means for the result of a run.
IDENTITY = "identity"  # which run it is (model, dataset, seed): named with the run
RECIPE = "recipe"      # how it trains: changes the result; a results table lists it
MACHINE = "machine"    # fits the run to the machine or the data at hand; may change the
#                        result, but a results table does not list it
RUNTIME = "runtime"    # where it runs and what it records: cannot change the result, so a


# How the command line spells a field.
ARGUMENT = "argument"  # a positional argument (MODEL, DATASET), not an option or a TOML key
VALUE = "value"        # --name VALUE
SWITCH = "switch"      # --name / --no-name
ON = "on"              # --name alone
OFF = "off"            # --no-name alone
MANY = "many"          # --name VALUE, repeatable (the field's name less its s): the values
#                        joined with ", "


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
                                                 "(alternating epochs); folders with "
                                                 "--image-size: resized-crop (a random 8-100 "
                                                 "percent of each full-resolution photo, "
                                                 "decoded each epoch)")
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
    model_args: str | None = option(None, kind=MANY,
                                    help="your own, torchvision's or timm's model: an argument "
                                         "its constructor takes, KEY=VALUE with a Python "
                                         "literal or a word (repeat for more), e.g. "
                                         "--model-arg width=64")
    pretrained: bool = option(False, kind=ON,
                              help="torchvision:NAME and timm:NAME: start from the published "
                                   "ImageNet weights, with a new classifier for the "
                                   "dataset's classes (fine-tuning)")
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
    in_memory: str = option("auto", role=RUNTIME, choices=IN_MEMORY,
                            help="folder datasets: yes = decode each split into memory; no = "
                                 "decode it a block at a time into the disk cache and train "
                                 "from there, read ahead in the background (for "
                                 "data larger than memory); auto = yes where it fits")
    workers: int | None = option(None, role=RUNTIME,
                                 help="--augment resized-crop: DataLoader worker processes "
                                      "that decode the photos, per process (0: in the "
                                      "training process)",
                                 default_text="on a GPU all CPUs but one (16 at most), on "
                                              "the CPU half of them",
                                 limits=Limits(high=256))
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
    """Whether field `key` means something for a run of `config` (a Config's dict): the
    ONLY_WITH fields where theirs has its value; --model-arg for the models that are not built
    in (named with a colon), --pretrained for torchvision's and timm's."""
    model = str(config.get("model"))
    if key == "model_args":
        return bool(hub_of(model)) or is_code(model)
    if key == "pretrained":
        return bool(hub_of(model))
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
