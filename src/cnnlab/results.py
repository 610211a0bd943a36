"""What sweeps and reports say about finished runs: the outcome of a run directory, mean and
spread over seeds, which configuration won, and the numbers and tables that show it."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .config import LISTED, format_value, option_name
from .files import read_json

METRICS = (  # summary key, column title, digits
    ("final_test_acc", "final test acc (%)", 2),
    ("test_acc_at_best", "test acc of best.pt (%)", 2),  # chosen on validation
    ("best_val_acc", "best val acc (%)", 2),
    ("best_test_acc", "best on test (%)", 2),  # chosen on test: optimistic
    ("best_epoch", "epochs to best", 1),
    ("train_seconds", "train time (s)", 1),
    ("images_per_second", "images/s", 0),
)

DIVERGED = "diverged.json"  # written into the directory of a run whose loss became NaN


def is_finished(run_dir: Path) -> bool:
    """Whether a run is done: it wrote summary.json, or it diverged (diverged.json)."""
    return (run_dir / "summary.json").is_file() or (run_dir / DIVERGED).is_file()


def diverged_error(run_dir: Path) -> str | None:
    """How a run that diverged ended - "diverged at step N (epoch E)", from its
    diverged.json (the error itself where it does not say the step) - else None."""
    path = run_dir / DIVERGED
    if not path.is_file():
        return None
    try:
        info = read_json(path)
        error, step, epoch = info.get("error"), info.get("step"), info.get("epoch")
    except (OSError, ValueError, AttributeError):
        error = step = epoch = None
    if step is None:
        return f"diverged: {error or 'the loss became NaN or infinite'}"
    return f"diverged at step {step}" + (f" (epoch {epoch})" if epoch is not None else "")


def aggregate(entries: list[tuple[str, dict, dict]],
              diverged: list[tuple[str, dict]] = ()) -> list[dict]:
    """(point label, config dict, summary) per finished run -> one row per label, in order of
    first appearance: label, config (the first run's), n, and `<metric>_mean` / `<metric>_std`
    (sample standard deviation over the runs; None for one run) for each of METRICS.
    `diverged`: (point label, config dict) per run that diverged; they are left out of n and
    the statistics and counted in the row's `diverged`."""
    groups: dict[str, list[tuple[dict, dict | None]]] = {}
    for label, config, summary in entries:
        groups.setdefault(label, []).append((config, summary))
    for label, config in diverged:
        groups.setdefault(label, []).append((config, None))
    rows = []
    for label, members in groups.items():
        done = [(c, s) for c, s in members if s is not None]
        row: dict[str, Any] = {"label": label, "config": (done or members)[0][0], "n": len(done),
                               "seeds": [c.get("seed") for c, _ in done],
                               "diverged": len(members) - len(done)}
        for key, _, _ in METRICS:
            values = [float(s[key]) for _, s in done if s.get(key) is not None]
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def shown_metrics(rows: list[dict]) -> tuple[tuple[str, str, int], ...]:
    """The METRICS that some row has a value of (the validation columns only where a run
    had a validation split)."""
    return tuple(m for m in METRICS if any(r.get(f"{m[0]}_mean") is not None for r in rows))


def mean_std(row: dict, key: str, digits: int) -> str:
    """`mean ± std` of an aggregated metric with `digits` decimals; `-` without values."""
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "-"
    number = "{:,.0f}" if digits == 0 else f"{{:.{digits}f}}"
    return number.format(mean) + (f" ± {number.format(std)}" if std is not None else "")


def _row_name(row: dict, keys: list[str]) -> str:
    if len(keys) == 1:
        value = format_value(row["config"].get(keys[0]))
        return f"{value} pooling" if keys[0] == "pool" else f"{option_name(keys[0])}={value}"
    return ", ".join(f"{option_name(k)}={format_value(row['config'].get(k))}" for k in keys) \
        or row["label"]


def verdict(rows: list[dict], keys: list[str]) -> str | None:
    """The two rows with the highest mean best test accuracy compared with Welch's t-test:
    the difference, its 95% confidence interval and p-value; "won" only where the difference
    is significant (p < 0.05), else how many seeds a point would resolve a difference of that
    size (two-sided test at 5%, power 80%). None for fewer than two rows. `keys`: the
    options that make the rows differ, to name them by."""
    ranked = sorted((r for r in rows if r["best_test_acc_mean"] is not None),
                    key=lambda r: r["best_test_acc_mean"], reverse=True)
    if len(ranked) < 2:
        return None
    first, second = ranked[0], ranked[1]
    (m1, s1, n1), (m2, s2, n2) = ((r["best_test_acc_mean"], r["best_test_acc_std"], r["n"])
                                  for r in (first, second))
    diff = m1 - m2
    counts = sorted({n1, n2})
    seeds = (f"{counts[0]} seed{'s' if counts[0] > 1 else ''} each" if len(counts) == 1
             else f"{n1} and {n2} seeds")
    runner_up = "" if len(ranked) == 2 else f" for the runner-up, {_row_name(second, keys)}"
    accuracies = (f"{mean_std(first, 'best_test_acc', 2)}% vs "
                  f"{mean_std(second, 'best_test_acc', 2)}% best test accuracy{runner_up}")
    if n1 < 2 or n2 < 2:
        return (f"{_row_name(first, keys)} scored higher: {accuracies} (difference {diff:.2f} "
                f"points, {seeds}). With one seed there is no spread to test the difference "
                "against: run more seeds (--seeds).")
    from scipy import stats

    se = (s1 ** 2 / n1 + s2 ** 2 / n2) ** 0.5
    if se == 0:  # every seed gave the same accuracy at both points
        p, low, high = (0.0 if diff else 1.0), diff, diff
    else:
        p = float(stats.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False).pvalue)
        df = se ** 4 / ((s1 ** 2 / n1) ** 2 / (n1 - 1) + (s2 ** 2 / n2) ** 2 / (n2 - 1))
        half = float(stats.t.ppf(0.975, df)) * se
        low, high = diff - half, diff + half
    numbers = (f"difference {diff:.2f} points, 95% confidence interval [{low:.2f}, {high:.2f}],"
               f" Welch's t-test p = {p:.2g}, {seeds}")
    if p < 0.05:
        return f"{_row_name(first, keys)} won: {accuracies} ({numbers})."
    text = (f"No significant difference between {_row_name(first, keys)} and "
            f"{_row_name(second, keys)}: {accuracies} ({numbers}).")
    if diff > 0:
        spread = ((s1 ** 2 + s2 ** 2) / 2) ** 0.5
        z = float(stats.norm.ppf(0.975) + stats.norm.ppf(0.8))
        needed = math.ceil(2 * (z * spread / diff) ** 2)
        text += f" Resolving a difference of this size would take about {needed} seeds a point."
    return text


def fixed_settings(configs: list[dict], skip: tuple[str, ...] = ()) -> str:
    """`option=value` for every recipe field (config.LISTED) that all runs share, but `skip`."""
    if not configs:
        return ""
    shared = [k for k in LISTED if k in configs[0] and k not in skip
              and all(c.get(k) == configs[0][k] for c in configs)]
    return ", ".join(f"{option_name(k)}={format_value(configs[0][k])}" for k in shared)


def _md_cell(text: Any) -> str:
    """Text for one Markdown table cell: `|` escaped, on one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)
