"""Figures drawn from run directories alone: a run's loss and accuracy curves (plot_run), its
utilisation over time (plot_utilization), several runs overlaid (plot_overlay), each
configuration's runs side by side (plot_comparison) and a confusion matrix (plot_confusion).

Curves are drawn against the epochs trained - the fraction of the training split seen
(`epochs_done`) - so that the points of a 1.5-epoch run lie at 1.0 and 1.5."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write
from .options import format_value
from .results import confidence_interval, eval_epochs
from .runs import (
    ACCURACY_PLOT,
    CONFIG,
    ENV,
    LOSS_PLOT,
    UTILIZATION_PLOT,
    DamagedFile,
    read_metrics,
    read_object,
)


def new_figure(figsize: tuple[float, float], dpi: int = 110):
    """A matplotlib Figure of its own, drawn without pyplot: no global backend is chosen or
    changed (a notebook's inline backend keeps working) and nothing needs closing."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, *,
             prefix: str = "") -> list[Path]:
    """Write loss.png (training loss per log window, test loss per evaluation) and
    accuracy.png (training accuracy per log window, test and validation accuracy per
    evaluation) into the run directory (or `out_dir`, names
    after `prefix`). Returns the paths written."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    run = _curves(run_dir)
    train_note, eval_note = _smoothing_notes(run.smoothing)
    validated = [(x, r) for x, r in run.evals if r.get("val_acc") is not None]
    written = []

    fig = new_figure((7, 4.2))
    ax = fig.subplots()
    if run.train:
        ax.plot(*_xy(run.train, "loss"), lw=1.2,
                label=_named("training loss", train_note, "mean over log window"))
    if run.evals:
        ax.plot(*_xy(run.evals, "test_loss"), "o-", lw=1.5, ms=4,
                label=_named("test loss", eval_note))
    if validated:
        ax.plot(*_xy(validated, "val_loss"), "s--", lw=1.2, ms=3,
                label=_named("validation loss", eval_note))
    written.append(finish_figure(fig, ax, out_dir / f"{prefix}{LOSS_PLOT}",
                                 xlabel="epochs trained", ylabel="cross-entropy loss",
                                 title=f"Loss - {run_dir.name}"))

    fig = new_figure((7, 4.2))
    ax = fig.subplots()
    trained = [(x, r) for x, r in run.train if r.get("train_acc") is not None]
    curves = []  # (xy, style, keyword arguments): drawn on the frame and in its inset
    if trained:  # on the augmented training images, as the model trained on them
        curves.append((_xy(trained, "train_acc"), "-", dict(
            lw=1.2, alpha=0.8, label="training accuracy (over each log window)")))
    if run.evals:
        curves.append((_xy(run.evals, "test_acc"), "o-", dict(lw=1.5, ms=4,
                                                                label="test accuracy")))
    if validated:
        curves.append((_xy(validated, "val_acc"), "s--", dict(lw=1.2, ms=3,
                                                                label="validation accuracy")))
    for xy, style, kw in curves:
        ax.plot(*xy, style, **kw)
    if validated:  # best.pt: chosen on validation
        x, best = max(validated, key=lambda p: p[1]["val_acc"])
        text = f"best.pt (validation {best['val_acc']:.2f}%): test {best['test_acc']:.2f}%"
    elif run.evals:
        x, best = max(run.evals, key=lambda p: p[1]["test_acc"])
        text = f"best on test {best['test_acc']:.2f}%"
    if run.evals:
        last = x >= max(px for px, _ in run.evals)  # at the right edge: the label leftwards
        ax.annotate(text, (x, best["test_acc"]), textcoords="offset points", xytext=(0, -16),
                    ha="right" if last else "center")
        _fit_accuracy(ax, [r[k] for _, r in run.evals for k in ("test_acc", "val_acc")
                           if r.get(k) is not None], curves)
    ax.set_ylim(top=min(100.0, ax.get_ylim()[1]))  # an accuracy axis stops at 100%
    written.append(finish_figure(fig, ax, out_dir / f"{prefix}{ACCURACY_PLOT}",
                                 xlabel="epochs trained", ylabel="accuracy (%)",
                                 title=f"Accuracy - {run_dir.name}"))
    return written


def _fit_accuracy(ax, evaluated: list[float], curves: list) -> None:
    """Fit the accuracy axis to the evaluations (98.85 to 99.20% is no flat line on the top
    edge), room below for the labels; where that leaves part of a curve out (training's
    first windows), the whole of every curve in a small panel."""
    low, high = min(evaluated), max(evaluated)
    span = max(high - low, 0.5)
    bottom, top = max(0.0, low - 0.8 * span), min(100.0, high + 0.4 * span)
    shown = [y for (_, ys), _, _ in curves for y in ys]
    ax.set_ylim(bottom, top)
    if shown and min(shown) < bottom:
        inset = ax.inset_axes([0.09, 0.1, 0.34, 0.3])  # lower left: curves rise to the right
        for xy, style, kw in curves:
            inset.plot(*xy, style, lw=1, ms=2, alpha=kw.get("alpha", 1.0))
        inset.set_ylim(top=100)
        inset.set_title("the whole range", fontsize=7)
        inset.tick_params(labelsize=6)
        inset.grid(alpha=0.3)


def _smoothing_notes(smoothing: float) -> tuple[str, str]:
    """What a legend says of the training and of the evaluation losses: with label smoothing
    the training loss includes the smoothing term while test and validation losses are plain
    cross-entropy, so the two are not comparable (0.53 against 0.12 for the fast LeNet-5)."""
    if not smoothing:
        return "", ""
    return f"label smoothing {format_value(smoothing)}", "plain cross-entropy"


def _named(name: str, *notes: str) -> str:
    """`name (note, note)`, without the empty notes."""
    shown = [n for n in notes if n]
    return f"{name} ({', '.join(shown)})" if shown else name


def _xy(points: list[tuple[float, dict]], key: str) -> tuple[list[float], list[float]]:
    return [x for x, _ in points], [r[key] for _, r in points]


def finish_figure(fig, ax, path: Path, *, legend_size: float | None = None,
                  legend_aside: bool = False, **labels) -> Path:
    """Label, grid and legend the axes (beside them where the points fill the whole plot) and
    save the figure atomically."""
    ax.set(**labels)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run without records yet has no curves
        ax.legend(fontsize=legend_size,
                  **(dict(loc="upper left", bbox_to_anchor=(1.02, 1)) if legend_aside else {}))
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


@dataclass
class _Curves:
    """One run's train and eval records, each at its place on the epoch axis."""

    train: list[tuple[float, dict]]
    evals: list[tuple[float, dict]]
    smoothing: float  # the training loss's label smoothing (config.json)


def _curves(run_dir: Path) -> _Curves:
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    # runs written before records had epochs_done: steps per epoch from the eval records
    steps_per_epoch = max((r["steps"] / r["epoch"] for r in evals if r.get("steps")), default=0)
    placed = [(r["epochs_done"] if "epochs_done" in r
               else r["step"] / steps_per_epoch if steps_per_epoch else None, r) for r in train]
    try:
        smoothing = float((read_object(run_dir / CONFIG) or {}).get("label_smoothing") or 0)
    except (DamagedFile, ValueError, TypeError):
        smoothing = 0.0
    return _Curves([(x, r) for x, r in placed if x is not None],
                   [(eval_epochs(r), r) for r in evals], smoothing)


def plot_overlay(run_dirs: list[str | Path], labels: list[str], out_dir: str | Path, *,
                 prefix: str = "") -> list[Path]:
    """Overlay several runs' curves: accuracy.png (test accuracy per evaluation) and loss.png
    (training loss per log window, solid; test loss per evaluation, dashed) in `out_dir`.
    Runs with the same label (the seeds of one grid point) share a colour; their mean test
    accuracy is the thick line. Returns the paths written."""
    from matplotlib import rcParams

    groups: dict[str, list[Path]] = {}
    for run_dir, label in zip(run_dirs, labels, strict=True):
        groups.setdefault(label, []).append(Path(run_dir))
    out_dir = Path(out_dir)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    curves = {label: [_curves(d) for d in dirs] for label, dirs in groups.items()}
    n_runs = sum(len(dirs) for dirs in groups.values())

    fig = new_figure((7.5, 4.5))
    ax = fig.subplots()
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for run in runs:
            if len(runs) > 1:
                ax.plot(*_xy(run.evals, "test_acc"), "o-", color=color, lw=0.8, ms=2.5,
                        alpha=0.35)
        evals = min((len(run.evals) for run in runs), default=0)
        if evals:
            mean = [statistics.fmean(run.evals[k][1]["test_acc"] for run in runs)
                    for k in range(evals)]
            name = f"{label} (mean of {len(runs)})" if len(runs) > 1 else label
            ax.plot([x for x, _ in runs[0].evals[:evals]], mean, "o-", color=color, lw=2,
                    ms=4, label=name)
    written = [finish_figure(fig, ax, out_dir / f"{prefix}{ACCURACY_PLOT}", legend_size=8,
                             xlabel="epochs trained", ylabel="test accuracy (%)",
                             title=f"Test accuracy - {len(groups)} configurations, {n_runs} runs")]

    fig = new_figure((7.5, 4.5))
    ax = fig.subplots()
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        train_note, eval_note = _smoothing_notes(runs[0].smoothing)
        for k, run in enumerate(runs):
            if run.train:
                ax.plot(*_xy(run.train, "loss"), color=color, lw=1, alpha=0.7,
                        label=_named(f"{label} train", train_note) if k == 0 else None)
            if run.evals:
                ax.plot(*_xy(run.evals, "test_loss"), "o--", color=color, lw=1.2, ms=4,
                        label=_named(f"{label} test", eval_note) if k == 0 else None)
    written.append(finish_figure(fig, ax, out_dir / f"{prefix}{LOSS_PLOT}", legend_size=8,
                                 xlabel="epochs trained", ylabel="cross-entropy loss",
                                 title=f"Loss - {len(groups)} configurations, {n_runs} runs"))
    return written


_SEED_SERIES = (  # summary key, legend name, marker: what each run of a configuration scored
    ("final_test_acc", "final test accuracy", "o"),
    ("test_acc_at_best", "test accuracy of best.pt\n(chosen on validation)", "s"),
    ("best_test_acc", "best on test\n(optimistic: chosen on test)", "^"),
)


def comparison_data(summaries: list[dict], labels: list[str]) -> list[dict]:
    """What comparison.png shows: per configuration (label, in order of first appearance),
    {"label", "series": {summary key: {"values", "mean", "interval"}}} for each series of
    _SEED_SERIES its runs have, with the 95% confidence interval of the mean (None for one
    run). A run's best is the test accuracy of best.pt where that was chosen on validation
    (test_acc_at_best), else its best on test."""
    groups: dict[str, dict[str, list[float]]] = {}
    for summary, label in zip(summaries, labels, strict=True):
        series = groups.setdefault(label, {key: [] for key, _, _ in _SEED_SERIES})
        best = ("test_acc_at_best" if summary.get("test_acc_at_best") is not None
                else "best_test_acc")
        for key in ("final_test_acc", best):
            if summary.get(key) is not None:
                series[key].append(float(summary[key]))
    return [{"label": label,
             "series": {key: {"values": values, "mean": statistics.fmean(values),
                              "interval": confidence_interval(values)}
                        for key, values in series.items() if values}}
            for label, series in groups.items()]


def plot_models(models: list[dict], path: str | Path) -> Path:
    """Draw models.png: each model's test accuracy against its parameters, its multiply-adds
    per image and its training time on this machine (log scales), named beside its point
    where the name does not cover another (`models`: dicts with "model", "accuracy",
    "parameters", "macs" and "train_seconds"; None where unknown)."""
    panels = (("parameters", "parameters"), ("macs", "multiply-adds per image"),
              ("train_seconds", "training time on this machine (s)"))
    fig = new_figure((14, 4.4))
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (key, label) in zip(axes, panels):
        shown = [m for m in models if m.get(key)]
        ax.scatter([m[key] for m in shown], [m["accuracy"] for m in shown], s=30,
                   color="tab:blue")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        _name_points(ax, [(m[key], m["accuracy"], m["model"]) for m in shown])
    axes[0].set_ylabel("test accuracy of best.pt (%)")
    fig.suptitle("Which network: accuracy against size, work and time")
    return save_figure(fig, Path(path))


# Where a point's name may go, in points from it: right or left of it, level, above, below
_NAME_PLACES = ((4, 3), (4, -10), (-4, 3), (-4, -10), (4, 13), (4, -20), (-4, 13), (-4, -20),
                (10, 24), (10, -31), (-10, 24), (-10, -31))


def _name_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Each point's name beside it, at the first of _NAME_PLACES where it covers no name
    placed before (greedily, from the top; the first place where every one does), a thin
    line leading from a name set further off to its point."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72  # pixels a point
    placed: list[tuple[float, float, float, float]] = []
    for x, y, name in sorted(points, key=lambda p: -p[1]):
        px, py = ax.transData.transform((x, y))
        width, height = 5.2 * len(name) * scale * 8 / 10, 9 * scale
        boxes = []
        for dx, dy in _NAME_PLACES:
            left = px + dx * scale - (width if dx < 0 else 0)
            boxes.append((left, py + dy * scale, left + width, py + dy * scale + height))
        box = next((b for b in boxes if not any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3]
                                                and o[1] < b[3] for o in placed)), boxes[0])
        placed.append(box)
        dx, dy = _NAME_PLACES[boxes.index(box)]
        far = abs(dy) > 10 or dx < 0
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                    ha="right" if dx < 0 else "left",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if far else None)


def plot_comparison(summaries: list[dict], labels: list[str], path: str | Path) -> Path:
    """Draw comparison.png: one column per configuration (`labels`: the runs' configurations),
    each run's final and best test accuracy as points (see comparison_data), beside them the
    configuration's mean and its 95% confidence interval over the runs (Student t). Unlike
    accuracy against epoch, it shows a sweep of one evaluation per run as more than a column
    of dots over one x value."""
    from matplotlib import rcParams

    columns = comparison_data(summaries, labels)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    fig = new_figure((1.3 * len(columns) + 6, 4.5))
    ax = fig.subplots()
    named: set[str] = set()  # the legend names given so far: one entry each
    mean_name = "mean, 95% confidence interval\n(Student t over the runs)"
    for i, column in enumerate(columns):
        shown = [(k, s) for k, s in enumerate(_SEED_SERIES) if s[0] in column["series"]]
        for j, (k, (key, name, marker)) in enumerate(shown):
            series = column["series"][key]
            x = i + (j - (len(shown) - 1) / 2) * 0.3
            mean, interval = series["mean"], series["interval"]
            ax.plot([x - 0.05] * len(series["values"]), series["values"], marker,
                    linestyle="none", color=colors[k], alpha=0.6, ms=5,
                    label=None if name in named else name)
            ax.errorbar([x + 0.05], [mean], fmt="_", color=colors[k], ms=14, mew=2, capsize=4,
                        yerr=None if interval is None
                        else [[mean - interval[0]], [interval[1] - mean]],
                        label=None if mean_name in named else mean_name)
            named |= {name, mean_name}
    slanted = max((len(c["label"]) for c in columns), default=0) > 12
    ax.set_xticks(range(len(columns)), [c["label"] for c in columns],
                  rotation=20 if slanted else 0, ha="right" if slanted else "center")
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylim(top=min(100.5, ax.get_ylim()[1]))
    return finish_figure(fig, ax, Path(path), legend_size=8, legend_aside=True,
                         ylabel="test accuracy (%)",
                         title=f"Test accuracy per configuration - {len(summaries)} runs")


_TELEMETRY_PANELS = (  # y label, unit, (record key, line name) per line
    ("utilisation (%)", "%", (("cpu_percent", "CPU (process, % of {cores} cores)"),
                              ("gpu_util", "GPU utilisation"))),
    ("memory (MB)", " MB", (("rss_mb", "host memory (RSS)"), ("gpu_mem_mb", "GPU memory"))),
    ("images/s", "", (("images_per_second", "training images/s"),)),
)


def plot_utilization(run_dir: str | Path, out_dir: str | Path | None = None, *,
                     prefix: str = "") -> Path | None:
    """Draw utilization.png (CPU and GPU utilisation, memory and images/s over time) from the
    `telemetry` records of metrics.jsonl, into the run directory (or `out_dir`). Returns the
    path, or None when the run has no telemetry records."""
    run_dir = Path(run_dir)
    panels = utilization_panels(run_dir)
    if not panels:
        return None
    fig = new_figure((7.5, 2.2 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (ylabel, _, lines) in zip(axes[:, 0], panels):
        for name, points in lines:
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.3, label=name)
        ax.set_ylabel(ylabel)
        # from 0, so that a wobble looks like one; utilisation up to 100%
        ax.set_ylim(0, 105 if ylabel.startswith("utilisation") else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("seconds since training start")
    axes[0, 0].set_title(f"Utilisation - {run_dir.name}")
    fig.tight_layout()
    return save_figure(fig, (Path(out_dir) if out_dir is not None else run_dir)
                       / f"{prefix}{UTILIZATION_PLOT}")


def utilization_panels(run_dir: Path) -> list[tuple[str, str, list[tuple[str, list]]]]:
    """(y label, unit, [(line name, [(seconds, value)])]) per panel of utilization.png, from
    the telemetry records; the process's CPU as a share of all the machine's cores (psutil
    counts one core as 100%; the cores from env.json), as the report's table gives it too."""
    telemetry = [r for r in read_metrics(run_dir) if r.get("type") == "telemetry"]
    try:
        cores = int((read_object(run_dir / ENV) or {})["cpu_cores_logical"])
    except (DamagedFile, ValueError, KeyError, TypeError):
        cores = os.cpu_count() or 1
    panels = []
    for ylabel, unit, series in _TELEMETRY_PANELS:
        lines = []
        for key, name in series:
            scale = 1 / cores if key == "cpu_percent" else 1
            points = [(r["elapsed"], r[key] * scale) for r in telemetry
                      if r.get(key) is not None and r.get("elapsed") is not None]
            if points:
                lines.append((name.format(cores=cores), points))
        if lines:
            panels.append((ylabel, unit, lines))
    return panels


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path, *,
                   title: str = "Confusion matrix") -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted), coloured by the
    share of each true class, with the counts written in when there are at most 20 classes."""
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(12.0, max(4.5, 0.45 * n + 2))
    fig = new_figure((size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(n)
    ax.set_xticks(ticks, classes, rotation=90 if max(map(len, classes), default=0) > 3 else 0)
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return save_figure(fig, Path(path))
