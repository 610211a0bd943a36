"""The report's two figures, drawn from a run directory's metrics.jsonl alone."""

from __future__ import annotations

from pathlib import Path

from .runs import atomic_write, read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (training loss per log window, test loss per epoch) and accuracy.png
    (test accuracy per epoch). Returns the paths written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    steps_per_epoch = max((r["steps"] / r["epoch"] for r in evals if r.get("steps")), default=0)
    plt = _pyplot()
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train and steps_per_epoch:
        ax.plot([r["step"] / steps_per_epoch for r in train], [r["loss"] for r in train],
                label="training loss (mean over log window)", lw=1.2)
    if evals:
        ax.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-",
                label="test loss", lw=1.5, ms=4)
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title=f"Loss - {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(run_dir / "loss.png")
    atomic_write(written[-1], lambda f: fig.savefig(f, format="png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if evals:
        ax.plot([r["epoch"] for r in evals], [r["test_acc"] for r in evals], "o-", lw=1.5, ms=4,
                label="test accuracy")
        best = max(evals, key=lambda r: r["test_acc"])
        ax.annotate(f"best {best['test_acc']:.2f}%", (best["epoch"], best["test_acc"]),
                    textcoords="offset points", xytext=(0, -16), ha="center")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Accuracy - {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(run_dir / "accuracy.png")
    atomic_write(written[-1], lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return written
