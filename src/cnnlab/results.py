"""What sweeps and reports say about finished runs: the outcome of a run directory, mean and
spread over seeds, which configuration won, and the numbers and tables that show it."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .errors import CnnlabError
from .models import entry
from .models import label as model_label
from .options import LISTED, applies, format_value, option_name
from .runs import DIVERGED, SUMMARY, DamagedFile, read_object

METRICS = (  # summary key, column title, digits
    ("final_test_acc", "final test acc (%)", 2),
    ("test_acc_at_best", "test acc of best.pt (%)", 2),  # chosen on validation
    ("best_val_acc", "best val acc (%)", 2),
    ("best_test_acc", "best on test (%)", 2),  # chosen on test: optimistic
    ("best_epochs_done", "epochs to best", 2),
    ("train_seconds", "train time (s)", 1),
    ("images_per_second", "images/s", 0),
)
# The column titles where some row chose best.pt on validation: beside it, the best-on-test
# figures must say which choice they are.
_VALIDATED_TITLES = {"test_acc_at_best": "test acc of best.pt, chosen on validation (%)",
                     "best_test_acc": "best on test, optimistic (%)",
                     "best_epochs_done": "epochs to best.pt"}
# Summary keys that runs written before them lack -> the key that stood for them: a finished
# run trained all its epochs; best_epoch counts whole epochs.
_FALLBACKS = {"epochs_done": "epochs", "best_epochs_done": "best_epoch"}



def metric(summary: dict, key: str) -> Any:
    """summary[key], or for a run written before summaries had it, what stood for it."""
    value = summary.get(key)
    return summary.get(_FALLBACKS[key]) if value is None and key in _FALLBACKS else value


def best_text(summary: dict) -> str:
    """Where best.pt was chosen and what it scored, in the count of epochs the report uses."""
    at = format_epochs(metric(summary, "best_epochs_done"))
    if summary.get("selected_on") == "validation":
        return (f"best.pt chosen on validation: epoch {at}, validation "
                f"{summary['best_val_acc']:.2f}%, test {summary['test_acc_at_best']:.2f}%")
    return f"best on test {summary['best_test_acc']:.2f}% (epoch {at})"


def eval_epochs(record: dict) -> float:
    """Where an eval record lies on the epoch axis: the fraction of the training split seen
    (epochs_done: 1.5 for the last evaluation of a 1.5-epoch run); the epoch number for runs
    written before records had it."""
    return record.get("epochs_done", record["epoch"])


def pct_text(value: Any, digits: int = 2) -> str:
    """A percentage as a table shows it: 98.73%; `-` for none."""
    return "-" if value is None else f"{float(value):.{digits}f}%"


def format_epochs(value: float | None) -> str:
    """Epochs trained, as read: 2, 1.5, 0.31; `-` for none."""
    return "-" if value is None else f"{round(float(value), 2):g}"


def confidence_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% confidence interval of the mean of `values` (Student t over them: mean ±
    t(0.975, n-1)·s/√n); None for fewer than two."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean, half = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    half *= float(stats.t.ppf(0.975, len(values) - 1))
    return mean - half, mean + half


def model_default(config: dict, key: str) -> str | None:
    """`max (default)` where option `key` was left to the model (None) and the model's registry
    entry gives it a default (LeNet-5's pool), else None."""
    if config.get(key) is not None:
        return None
    try:
        option = entry(str(config.get("model"))).options.get(key)
    except CnnlabError:
        return None
    return None if option is None else f"{format_value(option.default)} (default)"


def is_finished(run_dir: Path) -> bool:
    """Whether a run is done: it wrote summary.json, or it diverged (diverged.json)."""
    return (run_dir / SUMMARY).is_file() or (run_dir / DIVERGED).is_file()


def diverged_error(run_dir: Path) -> str | None:
    """How a run that diverged ended - "diverged at step N (epoch E)", from its
    diverged.json (the error itself where it does not say the step) - else None."""
    try:
        info = read_object(run_dir / DIVERGED)
    except DamagedFile:
        info = {}
    if info is None:
        return None
    error, step, epoch = info.get("error"), info.get("step"), info.get("epoch")
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
            values = [float(v) for _, s in done if (v := metric(s, key)) is not None]
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def shown_metrics(rows: list[dict]) -> tuple[tuple[str, str, int], ...]:
    """The METRICS that some row has a value of (the validation columns only where a run
    had a validation split, and then titles that say which figure was chosen on what)."""
    titles = _VALIDATED_TITLES if _validated(rows) else {}
    return tuple((key, titles.get(key, title), digits) for key, title, digits in METRICS
                 if any(r.get(f"{key}_mean") is not None for r in rows))


def _validated(rows: list[dict]) -> list[dict]:
    """The rows whose runs chose best.pt on a validation split."""
    return [r for r in rows if r.get("test_acc_at_best_mean") is not None]


def selection_note(rows: list[dict]) -> str | None:
    """What a table with validation columns puts side by side: best.pt chosen on validation
    (an honest test figure) beside the best evaluation on test (an optimistic one), and in a
    table that mixes them which rows chose on what. None without a validation split."""
    validated = _validated(rows)
    if not validated:
        return None
    others = [r["label"] for r in rows if r not in validated]
    where = (f" for {', '.join(r['label'] for r in validated)}, on the test split for "
             f"{', '.join(others)} (no validation split)" if others else "")
    return (f"best.pt was chosen on the validation split{where}. \"test acc of best.pt\" is "
            "the test accuracy of that choice, an honest figure; \"best on test\" is each "
            "run's highest test accuracy over its evaluations, chosen on the test split itself "
            "and so optimistic - the figure the verdict compares"
            + (", the only one every row has; \"epochs to best.pt\" counts to each row's own "
               "choice." if others else "."))


def mean_std_text(row: dict, key: str, digits: int) -> str:
    """`mean ± std` of an aggregated metric with `digits` decimals; `-` without values."""
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "-"
    number = "{:,.0f}" if digits == 0 else f"{{:.{digits}f}}"
    return number.format(mean) + (f" ± {number.format(std)}" if std is not None else "")


def _row_name(row: dict, keys: list[str]) -> str:
    if len(keys) == 1:
        value = shown_value(row["config"], keys[0])
        return f"{value} pooling" if keys[0] == "pool" else f"{option_name(keys[0])}={value}"
    return ", ".join(f"{option_name(k)}={shown_value(row['config'], k)}" for k in keys) \
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
    accuracies = (f"{mean_std_text(first, 'best_test_acc', 2)}% vs "
                  f"{mean_std_text(second, 'best_test_acc', 2)}% best test accuracy{runner_up}")
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
    """`option=value` for every recipe field (options.LISTED) that all runs share as they ran
    (shown_value: `precision=fp32 (auto)`), but `skip`: among the runs it means something for
    (options.ONLY_WITH: muon-lr, in muon runs), none where it means nothing for any."""
    if not configs:
        return ""
    shown = {k: {shown_value(c, k) for c in configs if applies(c, k)}
             for k in LISTED if k in configs[0] and k not in skip}
    return ", ".join(f"{option_name(k)}={values.pop()}" for k, values in shown.items()
                     if len(values) == 1 and all(k in c for c in configs))


def shown_value(config: dict, key: str) -> str:
    """An option's value as a table or sentence names it: what ran. One left to the model is
    named by the model's default (`max (default)`); one the run resolved (device, precision,
    channels-last: config.json's "resolved") by what it resolved to (`cpu (auto)`); one that
    means nothing for the run (muon-lr in an sgd run) by `-`."""
    if not applies(config, key):
        return "-"
    value = config.get(key)
    resolved = config.get("resolved")
    ran = resolved.get(key) if isinstance(resolved, dict) else None
    if ran is not None and ran != value:
        return f"{format_value(ran)} ({'default' if value is None else format_value(value)})"
    if key == "model":
        return model_label(str(value))
    return model_default(config, key) or value_text(value)


def value_text(value: Any) -> str:
    """A value of config.json or env.json as text: lists joined by `;`, dicts by `,`."""
    if isinstance(value, list):
        return "; ".join(value_text(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {value_text(v)}" for k, v in value.items())
    return format_value(value)


def _md_cell(text: Any) -> str:
    """Text for one Markdown table cell: `|` escaped, on one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)
