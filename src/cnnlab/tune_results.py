"""A search's results: tune.json (the plan and every trial's outcome, which reports read),
results.md, best.toml (the best trial's options), history.png and importance.png, from the
trial runs' own directories and the study's trials (those a search makes; refused ones and
any other are left out). `search` below is tune.Search: the search whose results these are."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .files import atomic_write, write_json
from .options import ARGUMENT, COMPARED, OPTIONS, applies, format_value, option_name
from .plots import finish_figure, new_figure
from .results import diverged_error, fixed_settings, format_epochs, md_table, metric
from .runs import (
    BEST_OPTIONS,
    CONFIG,
    HISTORY_PLOT,
    IMPORTANCE_PLOT,
    RESULTS_MD,
    SUMMARY,
    TUNE_FILE,
    DamagedFile,
    read_metrics,
    read_object,
)
from .study import REFUSED, RUN, Study
from .worker import refused_section

# Complete trials before parameter importances (over fewer they say nothing).
IMPORTANCE_TRIALS = 4
TRIAL_NAME = re.compile(r"trial-(\d{4,9})")  # a trial's run: trial-0000, trial-0001, ...


def retried(trials: list) -> set[int]:
    """The numbers of the trials that were queued again (a later trial stands for each)."""
    return {n for t in trials if isinstance(history := t.system_attrs.get("retry_history"),
                                            list) for n in history if type(n) is int}


def epochs_text(value: float) -> str:
    return f"{format_epochs(value)} epoch{'' if value == 1 else 's'}"


def short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


def _outcome(run_dir: Path) -> dict:
    """A trial run's best and final validation accuracy, the test accuracy of its best.pt,
    its training seconds and the epochs it trained (and was to train): from summary.json,
    or from the records of a run the pruner stopped (or one that diverged or still
    trains)."""
    try:
        epochs = (read_object(run_dir / CONFIG) or {}).get("epochs")
    except DamagedFile:
        epochs = None
    if (s := read_object(run_dir / SUMMARY)) is not None:
        return {"best_val_acc": s.get("best_val_acc"), "test_acc_at_best":
                s.get("test_acc_at_best"), "final_val_acc": s.get("final_val_acc"),
                "final_test_acc": s.get("final_test_acc"),
                "train_seconds": s.get("train_seconds"),
                "epochs_done": metric(s, "epochs_done"), "epochs": epochs}
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("type") == "eval" and r.get("val_acc") is not None]
    best = max(evals, key=lambda r: r["val_acc"], default={})
    return {"best_val_acc": best.get("val_acc"), "test_acc_at_best": best.get("test_acc"),
            "final_val_acc": evals[-1]["val_acc"] if evals else None,
            "final_test_acc": evals[-1].get("test_acc") if evals else None,
            "train_seconds": evals[-1].get("train_seconds") if evals else None,
            "epochs_done": max((r.get("epochs_done", 0) for r in records), default=0),
            "epochs": epochs}


def _rows(out: Path, trials: list) -> list[dict]:
    """One row per trial run, in run order: the latest trial of each (one queued again
    stands for the one its worker left); refused trials, and any whose run name is none a
    search makes, are left out."""
    from optuna.trial import TrialState


    again = retried(trials)
    rows = []
    for t in trials:
        run = t.user_attrs.get(RUN)
        if (t.number in again or REFUSED in t.system_attrs or not isinstance(run, str)
                or not TRIAL_NAME.fullmatch(run)):
            continue
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
                 TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(t.state)
        if state is None:
            state = "diverged" if diverged_error(out / run) else "failed"
        rows.append({"run": run, "number": int(run.rsplit("-", 1)[1]), "state": state,
                     "params": dict(t.params), **_outcome(out / run)})
    return sorted(rows, key=lambda r: r["number"])


def _best(complete: list[dict], target: float | None) -> dict | None:
    """The best of the complete trials' rows: the highest best validation accuracy, or with
    a `target` the fewest training seconds among those whose final validation accuracy
    reached it. None where there is none."""
    if target is None:
        return dict(max(complete, key=lambda r: r["best_val_acc"])) if complete else None
    hits = [r for r in reached(complete, target) if r["train_seconds"] is not None]
    return dict(min(hits, key=lambda r: r["train_seconds"])) if hits else None


def _target(info: dict) -> float | None:
    """A search's --target, from its plan (tune.json), or None."""
    return info["plan"]["tune"].get("target")


def _best_options(run_dir: Path) -> dict[str, Any]:
    """What a run trained with, as `cnnlab train --config` takes it: every option that can
    change the result (no model or dataset, no runtime option, no None: the default, none
    that means nothing for it, such as --muon-lr with sgd)."""
    config = read_object(run_dir / CONFIG, missing_ok=False)
    return {k: config[k] for k in COMPARED
            if OPTIONS[k].kind != ARGUMENT and config.get(k) is not None
            and applies(config, k)}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_best(out: Path, search, best: dict) -> None:
    """best.toml: the best trial's options, for `cnnlab train MODEL DATASET --config`."""
    searched = {d.key: d for d in search.space}
    found = (f"the best trial of {out}: {best['run']}, best validation accuracy "
             f"{best['best_val_acc']:.2f}% (test accuracy of its best.pt "
             f"{best['test_acc_at_best']:.2f}%)" if search.target is None else
             f"the fastest trial of {out} to reach {search.target:g}% on validation: "
             f"{best['run']}, {best['train_seconds']:.1f} s of training, final validation "
             f"accuracy {best['final_val_acc']:.2f}% (test {best['final_test_acc']:.2f}%)")
    lines = [f"# cnnlab tune: {found}",
             f"# train it: cnnlab train {search.base.model} {search.base.dataset} --config "
             f"{out / BEST_OPTIONS}"]
    for key, value in best["options"].items():
        note = f"  # searched: {searched[key].describe()}" if key in searched else ""
        lines.append(f"{option_name(key)} = {_toml_value(value)}{note}")
    atomic_write(out / BEST_OPTIONS, ("\n".join(lines) + "\n").encode())


def _importances(study, search, complete: int) -> dict[str, float]:
    """Each searched option's importance over the complete trials, summing to 1: Optuna's
    default, PED-ANOVA (how much the option's values tell the best tenth of the trials from
    the rest; deterministic, and no scikit-learn as fANOVA needs). {} with fewer than two
    options or IMPORTANCE_TRIALS complete trials, or where it cannot tell (values alike)."""
    if len(search.space) < 2 or complete < IMPORTANCE_TRIALS:
        return {}
    import warnings

    from optuna.importance import get_param_importances

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}
    return {k: float(v) for k, v in found.items() if math.isfinite(v)}


def _plot_history(rows: list[dict], path: Path, target: float | None = None) -> Path | None:
    """history.png: each trial's best validation accuracy (a pruned one's where it
    stopped) and the best so far, against the trial number; with a `target`, each trial's
    training seconds, those that reached it apart, and the fastest of them so far."""
    from matplotlib.ticker import MaxNLocator


    score = "best_val_acc" if target is None else "train_seconds"
    scored = [r for r in rows if r[score] is not None]
    if not scored:
        return None
    fig = new_figure((7, 4.2))
    ax = fig.subplots()
    best_of = [r for r in scored if r["state"] == "complete"]
    kinds = [("complete", "o", "complete")]
    if target is not None:
        best_of = reached(best_of, target)
        kinds = [("reached", "o", f"reached {target:g}% on validation"),
                 ("below", "o", "below the target")]
    for kind, marker, label in (*kinds,
                                ("pruned", "x", "pruned (where it was stopped)"),
                                ("diverged", "v", "diverged"), ("failed", "v", "failed"),
                                ("running", ".", "still running")):
        points = [r for r in scored if _kind(r, target) == kind]
        if points:
            ax.plot([r["number"] for r in points], [r[score] for r in points],
                    marker, ls="none", ms=6, label=label, mfc="none" if kind == "below"
                    else None)
    if best_of:
        pick = max if target is None else min
        best, xs, ys = None, [], []
        for r in best_of:
            best = r[score] if best is None else pick(best, r[score])
            xs.append(r["number"])
            ys.append(best)
        ax.step(xs + [rows[-1]["number"]], ys + [best], where="post", lw=1.5,
                label="best so far" if target is None else "fastest to the target so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are counted
    return finish_figure(fig, ax, path, xlabel="trial",
                         ylabel="best validation accuracy (%)" if target is None
                         else "training time (s)",
                         title=f"Optimisation history - {path.parent.name}")


def reached(rows: list[dict], target: float) -> list[dict]:
    return [r for r in rows if r["final_val_acc"] is not None
            and r["final_val_acc"] >= target]


def _kind(row: dict, target: float | None) -> str:
    """How history.png draws a trial: its state, a complete one of a --target search as
    reached or below."""
    if row["state"] != "complete" or target is None:
        return row["state"]
    return "reached" if reached([row], target) else "below"


def _no_importance(search, complete: int) -> str:
    """Why a search has no importance.png, in a sentence."""
    if len(search.space) < 2:
        return "No parameter importances: one option is searched, nothing to weigh it against."
    if complete < IMPORTANCE_TRIALS:
        return (f"No parameter importances yet: they need {IMPORTANCE_TRIALS} complete trials "
                f"({complete} so far).")
    return "No parameter importances: the complete trials' values cannot tell them apart."


def _plot_importance(importances: dict[str, float], complete: int, path: Path) -> Path:

    fig = new_figure((7, 1.2 + 0.5 * len(importances)))
    ax = fig.subplots()
    names = list(importances)[::-1]  # the most important on top
    ax.barh(names, [importances[n] for n in names])
    return finish_figure(fig, ax, path, xlabel="importance (PED-ANOVA, summing to 1)",
                         title=f"Parameter importances ({complete} complete trials)")


def _scored(search) -> str:
    """How results.md says the trials are scored."""
    if search.target is None:
        return ("Each trial is scored by its best validation accuracy - the epoch its best.pt "
                "was chosen on; the test accuracy of that best.pt chose nothing, so it is an "
                "honest estimate (choosing on test would make it optimistic).")
    return (f"Each trial is scored by its training time, to be as short as possible, if its "
            f"final validation accuracy reached {search.target:g}% (a trial below it does "
            "not count: Optuna's constrained TPE models it as infeasible); the test accuracy "
            "chose nothing, so it is an honest estimate.")


def states(rows: list[dict]) -> str:
    """How the trials ended: "4 complete, 2 pruned"."""
    counts = {s: sum(r["state"] == s for r in rows) for s in
              ("complete", "pruned", "diverged", "failed", "running", "waiting")}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none run"


def summary_lines(info: dict) -> list[str]:
    """What a search found, in sentences (results.md, the report and the command's end)."""
    rows = info["rows"]
    lines = [f"{len(rows)} of {info['trials']} trials: {states(rows)}."]
    if info["epochs_unpruned"]:
        saved = 1 - info["epochs_trained"] / info["epochs_unpruned"]
        lines.append(f"Epochs trained: {format_epochs(info['epochs_trained'])} in all, against "
                     f"{format_epochs(info['epochs_unpruned'])} had no trial been pruned "
                     f"({saved:.0%} saved).")
    best, target = info.get("best"), _target(info)
    if target is not None:
        complete = [r for r in rows if r["state"] == "complete"]
        hits = len(reached(complete, target))
        lines.append(f"{hits} of {len(complete)} complete trials reached the target, "
                     f"{target:g}% on validation.")
    if best:
        params = ", ".join(f"{k}={short_value(v)}" for k, v in best["params"].items())
        lines.append(f"Best: {best['run']}, validation {best['best_val_acc']:.2f}% (test "
                     f"{best['test_acc_at_best']:.2f}% of its best.pt), with {params}."
                     if target is None else
                     f"Fastest to the target: {best['run']}, {best['train_seconds']:.1f} s of "
                     f"training, final validation {best['final_val_acc']:.2f}% (test "
                     f"{best['final_test_acc']:.2f}%), with {params}.")
    return lines


def trials_table(info: dict) -> tuple[list[str], list[list[str]]]:
    """The trials as a table: header and rows."""
    names = [d["option"] for d in info["plan"]["tune"]["space"]]
    timed = _target(info) is not None

    def pct(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    def scores(r: dict) -> list[str]:
        if not timed:
            return [pct(r["best_val_acc"]), pct(r["test_acc_at_best"])]
        seconds = r.get("train_seconds")
        return ["-" if seconds is None else f"{seconds:.1f}", pct(r.get("final_val_acc")),
                pct(r.get("final_test_acc"))]

    return (["trial", "state", *names,
             *(["training (s)", "final val acc (%)", "final test acc (%)"] if timed else
               ["best val acc (%)", "test acc of best.pt (%)"]), "epochs trained"],
            [[r["run"], r["state"], *(short_value(r["params"][n]) if n in r["params"] else "-"
                                      for n in names),
              *scores(r), format_epochs(r["epochs_done"])] for r in info["rows"]])


def write_results(out: str | Path, search, where) -> dict:
    """tune.json, results.md, best.toml, history.png and importance.png of the search's
    trials so far. Returns tune.json's content, with "out"."""

    out = Path(out)
    study = Study(where.url, where.name, search.plan(), direction=search.direction)
    trials = study.study.get_trials(deepcopy=False)
    rows = _rows(out, trials)
    complete = [r for r in rows if r["state"] == "complete" and r["best_val_acc"] is not None]
    best = _best(complete, search.target)
    if best:
        best["options"] = _best_options(out / best["run"])
        _write_best(out, search, best)
    importances = _importances(study.study, search, len(complete))
    info = {"model": search.base.model, "dataset": search.base.dataset, "plan": search.plan(),
            "searched": [d.describe() for d in search.space], "trials": search.trials,
            "sampler": search.sampler, "pruner": search.pruner,
            "rows": rows, "best": best, "importances": importances,
            "epochs_trained": sum(r["epochs_done"] or 0 for r in rows),
            "epochs_unpruned": sum((r["epochs"] if r["state"] == "pruned" else
                                    r["epochs_done"]) or 0 for r in rows)}
    figures = {}
    if _plot_history(rows, out / HISTORY_PLOT, search.target):
        figures[HISTORY_PLOT] = ("Each trial's best validation accuracy and the best so far"
                                  if search.target is None else
                                  "Each trial's training time and the fastest to the target")
    if importances:
        _plot_importance(importances, len(complete), out / IMPORTANCE_PLOT)
        figures[IMPORTANCE_PLOT] = ("How much each searched option decides whether a "
                                     "trial is among the best")
    info["figures"] = figures
    info["no_importance"] = None if importances else _no_importance(search, len(complete))
    write_json(out / TUNE_FILE, info)

    model, dataset = search.base.model, search.base.dataset
    seeded = "unseeded: --storage" if where.shared else f"seeded by --seed {search.base.seed}"
    fixed = fixed_settings([search.base.to_dict()], skip=tuple(d.key for d in search.space))
    lines = [f"# Search: {model} on {dataset}", "",
             f"Sampler: {search.sampler} ({seeded}); pruner: {search.pruner}. {_scored(search)}",
             "",
             f"Searched: {'; '.join(info['searched'])}.", "",
             f"Fixed settings: {fixed}.", ""]
    for text in summary_lines(info):
        lines += [text, ""]
    if best:
        lines += [f"The best trial's options are in best.toml: `cnnlab train {model} {dataset} "
                  f"--config {out / BEST_OPTIONS}`.", ""]
    for name, alt in info["figures"].items():
        lines += [f"![{alt}]({name})", ""]
    if info["no_importance"]:
        lines += [info["no_importance"], ""]
    header, table = trials_table(info)
    lines += ["## Trials", "", md_table(
        header, [[f"[{c[0]}]({c[0]}/)", *c[1:]] for c in table]), ""]
    if best:
        lines += [f"## The best trial: {best['run']}", "",
                  f"![Loss of {best['run']}]({best['run']}/loss.png)", "",
                  f"![Accuracy of {best['run']}]({best['run']}/accuracy.png)", ""]
    refused = study.refused()
    lines += refused_section(refused)
    atomic_write(out / RESULTS_MD, "\n".join(lines).encode())
    return info | {"out": str(out), "refused": refused}
