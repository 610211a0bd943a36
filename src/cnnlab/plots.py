"""Figures drawn from run directories alone: a run's loss and accuracy curves (plot_run), its
utilisation over time (plot_utilization), several runs overlaid (plot_overlay) and a
confusion matrix (plot_confusion)."""

from __future__ import annotations

import os
from pathlib import Path

from .files import atomic_write, read_json
from .runs import read_metrics


def _figure(figsize: tuple[float, float], dpi: int = 110):
    """A matplotlib Figure of its own, drawn without pyplot: no global backend is chosen or
    changed (a notebook's inline backend keeps working) and nothing needs closing."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, *,
             prefix: str = "") -> list[Path]:
    """Write loss.png (training loss per log window, test loss per epoch) and accuracy.png
    (test accuracy per epoch) into the run directory (or `out_dir`, names after `prefix`).
    Returns the paths written."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    train, evals, steps_per_epoch = _curves(run_dir)
    written = []

    fig = _figure((7, 4.2))
    ax = fig.subplots()
    if train and steps_per_epoch:
        ax.plot([r["step"] / steps_per_epoch for r in train], [r["loss"] for r in train],
                label="training loss (mean over log window)", lw=1.2)
    if evals:
        ax.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-",
                label="test loss", lw=1.5, ms=4)
    validated = [r for r in evals if r.get("val_acc") is not None]
    if validated:
        ax.plot([r["epoch"] for r in validated], [r["val_loss"] for r in validated], "s--",
                label="validation loss", lw=1.2, ms=3)
    written.append(_finish(fig, ax, out_dir / f"{prefix}loss.png", xlabel="epoch",
                           ylabel="cross-entropy loss", title=f"Loss - {run_dir.name}"))

    fig = _figure((7, 4.2))
    ax = fig.subplots()
    if evals:
        ax.plot([r["epoch"] for r in evals], [r["test_acc"] for r in evals], "o-", lw=1.5, ms=4,
                label="test accuracy")
    if validated:  # best.pt: chosen on validation
        ax.plot([r["epoch"] for r in validated], [r["val_acc"] for r in validated], "s--",
                lw=1.2, ms=3, label="validation accuracy")
        best = max(validated, key=lambda r: r["val_acc"])
        ax.annotate(f"best.pt (validation {best['val_acc']:.2f}%): test {best['test_acc']:.2f}%",
                    (best["epoch"], best["test_acc"]), textcoords="offset points",
                    xytext=(0, -16), ha="center")
    elif evals:
        best = max(evals, key=lambda r: r["test_acc"])
        ax.annotate(f"best on test {best['test_acc']:.2f}%", (best["epoch"], best["test_acc"]),
                    textcoords="offset points", xytext=(0, -16), ha="center")
    ax.set_ylim(top=min(100.0, ax.get_ylim()[1]))  # an accuracy axis stops at 100%
    written.append(_finish(fig, ax, out_dir / f"{prefix}accuracy.png", xlabel="epoch",
                           ylabel="accuracy (%)", title=f"Accuracy - {run_dir.name}"))
    return written


def _finish(fig, ax, path: Path, *, legend_size: float | None = None, **labels) -> Path:
    """Label, grid and legend the axes and save the figure atomically."""
    ax.set(**labels)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run without records yet has no curves
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def _curves(run_dir: Path) -> tuple[list[dict], list[dict], float]:
    """(train records, eval records, steps per epoch) of one run."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    steps_per_epoch = max((r["steps"] / r["epoch"] for r in evals if r.get("steps")), default=0)
    return train, evals, steps_per_epoch


def plot_overlay(run_dirs: list[str | Path], labels: list[str], out_dir: str | Path, *,
                 prefix: str = "") -> list[Path]:
    """Overlay several runs' curves: accuracy.png (test accuracy per epoch) and loss.png
    (training loss per log window, solid; test loss per epoch, dashed) in `out_dir`.
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

    fig = _figure((7.5, 4.5))
    ax = fig.subplots()
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for _, evals, _ in runs:
            if len(runs) > 1:
                ax.plot([r["epoch"] for r in evals], [r["test_acc"] for r in evals], "o-",
                        color=color, lw=0.8, ms=2.5, alpha=0.35)
        epochs = min((len(e) for _, e, _ in runs), default=0)
        if epochs:
            mean = [sum(e[k]["test_acc"] for _, e, _ in runs) / len(runs) for k in range(epochs)]
            name = f"{label} (mean of {len(runs)})" if len(runs) > 1 else label
            ax.plot([runs[0][1][k]["epoch"] for k in range(epochs)], mean, "o-", color=color,
                    lw=2, ms=4, label=name)
    written = [_finish(fig, ax, out_dir / f"{prefix}accuracy.png", legend_size=8,
                       xlabel="epoch", ylabel="test accuracy (%)",
                       title=f"Test accuracy - {len(groups)} configurations, {n_runs} runs")]

    fig = _figure((7.5, 4.5))
    ax = fig.subplots()
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for k, (train, evals, steps_per_epoch) in enumerate(runs):
            if train and steps_per_epoch:
                ax.plot([r["step"] / steps_per_epoch for r in train], [r["loss"] for r in train],
                        color=color, lw=1, alpha=0.7, label=f"{label} train" if k == 0 else None)
            if evals:
                ax.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o--",
                        color=color, lw=1.2, ms=4, label=f"{label} test" if k == 0 else None)
    written.append(_finish(fig, ax, out_dir / f"{prefix}loss.png", legend_size=8,
                           xlabel="epoch", ylabel="cross-entropy loss",
                           title=f"Loss - {len(groups)} configurations, {n_runs} runs"))
    return written


_TELEMETRY_PANELS = (  # CPU: the process's share of all cores (psutil counts one core as 100)
    ("utilisation (%)", (("cpu_percent", "CPU (process, % of {cores} cores)"),
                         ("gpu_util", "GPU"))),
    ("memory (MB)", (("rss_mb", "host RSS"), ("gpu_mem_mb", "GPU memory"))),
    ("images/s", (("images_per_second", "training throughput"),)),
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
    fig = _figure((7.5, 2.2 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (ylabel, lines) in zip(axes[:, 0], panels):
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
    return _save(fig, (Path(out_dir) if out_dir is not None else run_dir)
                 / f"{prefix}utilization.png")


def utilization_panels(run_dir: Path) -> list[tuple[str, list[tuple[str, list]]]]:
    """(y label, [(line name, [(seconds, value)])]) per panel of utilization.png, from the
    telemetry records; the process's CPU as a share of all the machine's cores."""
    telemetry = [r for r in read_metrics(run_dir) if r.get("type") == "telemetry"]
    try:
        cores = int(read_json(run_dir / "env.json")["cpu_cores_logical"])
    except (OSError, ValueError, KeyError, TypeError):
        cores = os.cpu_count() or 1
    panels = []
    for ylabel, series in _TELEMETRY_PANELS:
        lines = []
        for key, name in series:
            scale = 1 / cores if key == "cpu_percent" else 1
            points = [(r["elapsed"], r[key] * scale) for r in telemetry
                      if r.get(key) is not None and r.get("elapsed") is not None]
            if points:
                lines.append((name.format(cores=cores), points))
        if lines:
            panels.append((ylabel, lines))
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
    fig = _figure((size + 1, size))
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
    return _save(fig, Path(path))
