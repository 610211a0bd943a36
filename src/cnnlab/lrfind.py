"""`cnnlab lr-find`: the learning-rate range test (Smith 2015, "Cyclical Learning Rates for
Training Neural Networks"; fastai's lr_find). A throw-away model, built as `cnnlab train`
builds it, takes one real training step per learning rate while the rate grows exponentially
from a start to an end; the loss, smoothed, against the rate shows where training works:

    lr_find.json  the config, each step's lr, loss and smoothed loss, the two suggestions
    lr_find.png   the smoothed (and raw) loss against the lr, the suggestions marked

The test stops early once the smoothed loss is over 4x its minimum or not finite. torch is
imported only when the test runs: the command's parser reads the defaults here."""

from __future__ import annotations

import contextlib
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import option_values
from .config import load_toml, resolve, run_config
from .devices import resolve_device
from .errors import CnnlabError
from .files import atomic_write, write_json
from .options import OFF, ON, OPTIONS, SWITCH, field_name, format_value, option_name
from .progress import Phase
from .runs import default_run_dir, new_dir

if TYPE_CHECKING:
    from .engine import Batch
    from .options import Config
    from .trainer import Training

START_LR, END_LR, STEPS = 1e-7, 10.0, 100  # the defaults of --start-lr, --end-lr, --steps
MIN_STEPS, MAX_STEPS = 10, 1000
BETA = 0.98       # the loss's exponential smoothing, bias-corrected (as fastai's)
STOP_FACTOR = 4.0  # stop once the smoothed loss exceeds this many times its minimum
SKIP_START = 0.1  # the share of first points the steepest descent is not looked for in
RESULT, PLOT = "lr_find.json", "lr_find.png"


@dataclass
class Sweep:
    """The test's points: each step's lr, loss and smoothed loss, and why it stopped early
    (None: it took every step)."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stop: str | None = None
    _average: float = 0.0

    def add(self, lr: float, loss: float) -> bool:
        """Record one step's loss at `lr` (a non-finite one is not recorded); False once
        the test should stop."""
        if not math.isfinite(loss):
            self.stop = f"the loss became NaN or infinite at lr {lr:.3g}"
            return False
        self._average = BETA * self._average + (1 - BETA) * loss
        smooth = self._average / (1 - BETA ** (len(self.lrs) + 1))
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(smooth)
        if not math.isfinite(smooth) or smooth > STOP_FACTOR * min(self.smoothed):
            self.stop = (f"the smoothed loss exceeded {STOP_FACTOR:g}x its minimum at lr "
                         f"{lr:.3g}")
            return False
        return True


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    """Refuse a range the test cannot step through (before anything is loaded)."""
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise CnnlabError(f"--steps must be {MIN_STEPS} to {MAX_STEPS}, got {steps}")
    for name, value in (("--start-lr", start_lr), ("--end-lr", end_lr)):
        if not (math.isfinite(value) and value > 0):
            raise CnnlabError(f"{name} must be a positive finite number, got {value}")
    if end_lr <= start_lr:
        raise CnnlabError(f"--end-lr ({end_lr:g}) must be above --start-lr ({start_lr:g})")


def slopes(x: list[float], y: list[float]) -> list[float]:
    """dy/dx at each point: central differences inside, one-sided at the ends (as
    numpy.gradient); at least two points."""
    last = len(y) - 1
    return [(y[min(i + 1, last)] - y[max(i - 1, 0)]) / (x[min(i + 1, last)] - x[max(i - 1, 0)])
            for i in range(len(y))]


def suggestions(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """`steepest`: the lr where the smoothed loss falls fastest against log10(lr), looked for
    from the first tenth of the points on up to its minimum; `minimum_over_10`: the lr of
    the minimum / 10 (not below the first lr)."""
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    gradient = slopes([math.log10(lr) for lr in lrs], smoothed)
    first = min(int(SKIP_START * len(lrs)), low)
    steep = min(range(first, low + 1), key=gradient.__getitem__)
    return {"steepest": lrs[steep], "minimum_over_10": max(lrs[low] / 10, lrs[0])}


def train_command(model: str, dataset: str, lr: float, options: dict[str, Any],
                  config: str | Path | None = None) -> str:
    """`cnnlab train MODEL DATASET --lr LR` with the train options given (as field names or
    option names, values typed; --lr replaced) and --config."""

    words = ["cnnlab", "train", model, dataset, "--lr", f"{lr:.3g}"]
    if config is not None:
        words += ["--config", str(config)]
    for key, value in options.items():
        name = field_name(key)
        if value is None or name == "lr":
            continue
        flag, kind = f"--{option_name(name)}", OPTIONS[name].kind
        if kind in (SWITCH, ON, OFF):  # a flag alone; ON and OFF say one of the two values
            if kind == SWITCH or (kind == ON) == bool(value):
                words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words += [flag, format_value(value)]
    return shlex.join(words)


# The options of `cnnlab train` that mean nothing to the test, which `cnnlab lr-find` does not
# take: the length and schedule of a run (the test takes --steps at a constant rate), its
# evaluations and checkpoints, what it records, the weight averages (see _range_test) and
# what needs several processes.
NOT_USED = frozenset({
    "epochs", "schedule", "val_split", "eval_every", "eval_batch_size", "tta", "ema",
    "lookahead", "checkpoint_every", "log_every", "telemetry", "tensorboard", "detect_anomaly",
    "sync_bn"})


def lr_find(model: str, dataset: str, *, config: str | Path | None = None,
            out: str | Path | None = None, start_lr: float = START_LR, end_lr: float = END_LR,
            steps: int = STEPS, progress: bool = True, **options: Any) -> dict:
    """Run the range test on `model` and `dataset` with the options of `cnnlab train`
    (`options` as cnnlab.train takes them, `config` a TOML file; the schedule is constant
    for the test) and write lr_find.json and lr_find.png into `out` (default
    runs/lr-find-<time>-<model>-<dataset>). Returns lr_find.json's content, with "out" and
    the "command" that trains at the steepest suggestion. Raises CnnlabError on bad input."""

    started = time.perf_counter()
    check_range(start_lr, end_lr, steps)
    file_values = option_values(load_toml(config), "config file key") if config else {}
    cfg = resolve(model, dataset, file_values=file_values,
                  overrides={**options, "schedule": "constant"})
    path, created = _claim(out, cfg.model, cfg.dataset)
    try:
        resolved, sweep = _range_test(cfg, start_lr, end_lr, steps, progress)
        suggested = suggestions(sweep.lrs, sweep.smoothed)
        result = {"config": resolved, "start_lr": start_lr, "end_lr": end_lr,
                  "steps": steps, "steps_done": len(sweep.lrs),
                  "stopped_early": sweep.stop is not None, "stop_reason": sweep.stop,
                  "suggestions": suggested, "lrs": sweep.lrs, "losses": sweep.losses,
                  "smoothed": sweep.smoothed,
                  "command": train_command(model, dataset, suggested["steepest"], options,
                                           config)}
        plot_lr_find(result, path / PLOT)
        result["seconds"] = round(time.perf_counter() - started, 3)
        write_json(path / RESULT, result)
    except BaseException:
        if created:  # an empty directory left behind would only mislead
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return result | {"out": str(path)}


def _claim(out: str | Path | None, model: str, dataset: str) -> tuple[Path, bool]:
    """The directory to write into, created now (before the test): `out`, else a new
    runs/lr-find-<time>-<model>-<dataset>; and whether this call created it."""
    if out is None:
        base = default_run_dir(model, dataset)
        return new_dir(base.with_name(f"lr-find-{base.name}")), True
    path = Path(out)
    try:
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"cannot create {path}: {e.strerror or e}") from None
    return path, not existed


def _range_test(cfg: Config, start_lr: float, end_lr: float, steps: int,
                progress: bool) -> tuple[dict, Sweep]:
    """Build the run as training does and take up to `steps` training steps, the lr of each
    param group set before each (keeping the groups' ratios, e.g. --norm-lr-scale's), over
    as many epochs as it takes. The weight averages (--ema, --lookahead) are left out: they
    do not change the loss of the model being trained. (resolved config, points)"""
    from .trainer import build, torch_settings

    device = resolve_device(cfg.device)
    sweep = Sweep()
    with torch_settings(cfg, device):
        t = build(cfg, device, progress=progress)
        if len(t.train_batches) == 0:
            raise CnnlabError(f"{cfg.dataset} has no training images")
        groups = t.state.optimizer.param_groups
        ratios = [g["lr"] / groups[0]["lr"] for g in groups]
        t.net.train()
        with Phase(f"lr-find {cfg.model} on {cfg.dataset}", steps, "steps",
                   enabled=progress) as phase:
            for i, batch in zip(range(steps), _batches(t)):
                lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
                for group, ratio in zip(groups, ratios):
                    group["lr"] = lr * ratio
                loss = float(t.train_step(batch))  # read back each step: this is no loop
                phase.update()
                if not sweep.add(lr, loss):
                    break
    if len(sweep.lrs) < 2:
        raise CnnlabError(f"the loss was NaN or infinite from the start ({sweep.stop}); "
                          "lower --start-lr")
    return run_config(cfg, device, t.state.precision.name, 1, t.channels_last), sweep


def _batches(t: Training) -> Iterator[Batch]:
    """The training batches, epoch after epoch, without end (each epoch shuffled and
    augmented as in training)."""
    epoch = 1
    while True:
        yield from t.train_batches.batches(t.train_batches.new_order(), 0, epoch)
        epoch += 1


def plot_lr_find(result: dict, path: Path) -> Path:
    """lr_find.png: the smoothed loss and, faint, each step's loss against the lr (log
    scale), the two suggestions as labelled vertical lines."""
    from matplotlib.figure import Figure

    lrs, smoothed, cfg = result["lrs"], result["smoothed"], result["config"]
    fig = Figure(figsize=(7, 4.2), dpi=110)  # drawn without pyplot, as plots.py draws
    ax = fig.subplots()
    ax.plot(lrs, result["losses"], lw=0.8, alpha=0.3, color="tab:blue", label="loss per step")
    ax.plot(lrs, smoothed, lw=1.6, color="tab:blue",
            label=f"smoothed loss (exponential, beta {BETA:g})")
    marks = (("steepest", "steepest descent", "tab:red"),
             ("minimum_over_10", "minimum / 10", "tab:green"))
    for key, name, color in marks:
        lr = result["suggestions"][key]
        ax.axvline(lr, color=color, ls="--", lw=1.2, label=f"{name}: lr {lr:.3g}")
        at = min(range(len(lrs)), key=lambda i: abs(lrs[i] - lr))  # on the curve too
        ax.plot([lrs[at]], [smoothed[at]], "o", color=color, ms=6)
    # clipped as fastai does: the descent fills the frame, from the highest smoothed loss
    # before its minimum (the first points left out) down to the minimum; the divergence
    # after it leaves through the top instead of flattening the useful part into a line
    first, bottom = int(SKIP_START * len(smoothed)), smoothed.index(min(smoothed))
    high = max(smoothed[first:bottom + 1] or smoothed)
    low = min([*smoothed, *result["losses"][first:bottom + 1]])
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    ax.set_ylim(low - margin, high + margin)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss",
           title=f"Learning-rate range test - {cfg['model']} on {cfg['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path
