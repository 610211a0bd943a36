"""Sweeps: a grid of train options times seeds, each point an ordinary run directory.

    cnnlab sweep lenet5 mnist --grid pool=max,avg --seeds 3 --epochs 5
    cnnlab sweep --config configs/sweeps/pooling.toml

A sweep file (TOML) names the model and dataset, the seeds, the fixed options and the grid:

    model = "lenet5"
    dataset = "mnist"
    seeds = 3                  # seed, seed+1, ... per point (seed: [train] or --seed, else 0)
    [train]                    # fixed options of every run: the names of `cnnlab train` options
    preset = "seed"
    [grid]                     # the cross product of these values
    pool = ["max", "avg"]

Points that are no cross product are listed instead: `points = [{optimizer = "sgd", lr = 0.01},
{optimizer = "adamax", lr = 0.002}]`; with both, every point meets every grid combination.

The sweep directory holds one run directory per point and seed (`pool=max-seed=0`), sweep.json
(the plan), results.csv and results.md (mean and std over seeds per point), accuracy.png /
loss.png (every point's curves overlaid), comparison.png (each point's runs side by side) and,
by default, study.db: the sweep's Optuna study (study.py), whose workers - the processes of
`--jobs N`, the same command run again or on other machines with `--storage` - take the points
one each. A point is finished when its summary.json exists, or when it diverged (its loss
became NaN: diverged.json holds the error, the sweep goes on with the other runs, and the
results count it apart from the mean and std); an unfinished one continues from its
checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import nearest_option, short, typed_value, validate, with_defaults
from .config import load_toml, resolve
from .errors import (
    CnnlabError,
    did_you_mean,
    one_line,
    shown,
)
from .files import atomic_write, safe_name, write_json
from .models import label as model_label
from .options import COMPARED, OPTIONS, Config, field_name, format_value, option_name
from .plots import plot_comparison, plot_overlay
from .progress import say as say_line
from .progress import silent
from .results import (
    METRICS,
    aggregate,
    best_text,
    diverged_error,
    fixed_settings,
    format_epochs,
    is_finished,
    md_table,
    mean_std_text,
    metric,
    selection_note,
    shown_metrics,
    verdict,
)
from .runs import (
    COMPARISON_PLOT,
    CONFIG,
    RESULTS_CSV,
    RESULTS_MD,
    SUMMARY,
    SWEEP_FILE,
    SWEEP_LOCK,
    DamagedFile,
    hold,
    read_object,
)
from .study import RUN, Study, run_workers
from .worker import (
    Job,
    Refused,
    Where,
    attempt,
    check_jobs,
    check_run_name,
    config_difference,
    on_slot,
    refused_section,
    stored_params,
    train_or_continue,
    work,
)

SWEEP_FILE_KEYS = ("model", "dataset", "seeds", "train", "grid", "points")
MAX_SEEDS = 1000  # runs per point
MAX_RUNS = 10_000  # runs per sweep: each is a run directory


def _grid_key(key: str) -> str:
    """A grid key with '-' or '_' -> the Config field name; anything else is an error."""
    name = field_name(key)
    if name == "seed":
        raise CnnlabError("seed cannot be a grid key: use --seeds N (seeds seed, seed+1, ...) "
                          "and --seed for the first one")
    if name not in OPTIONS:
        known = [option_name(k) for k in OPTIONS if k != "seed"]
        raise CnnlabError(f"unknown grid key '{key}'{nearest_option(key, known)} (grid keys "
                          f"are train options: {', '.join(known)})")
    return name


def grid_value(key: str, value: Any, *, text: bool = False) -> Any:
    """A grid value (a TOML value; with `text`, command-line text) as the type of
    Config.`key`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CnnlabError(f"grid {option_name(key)}: empty value")
    return typed_value(key, value, what=f"grid {option_name(key)}", text=text)


def parse_grid_arg(text: str) -> tuple[str, list[Any]]:
    """`key=v1,v2,...` -> (field name, typed values). Values are split on ';' when the text
    holds one (for values with commas: `augment=none;crop,flip`), else on ','."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise CnnlabError(f"--grid '{text}': write KEY=VALUE1,VALUE2,...")
    name = _grid_key(key)
    parts = values.split(";" if ";" in values else ",")
    return name, [grid_value(name, v, text=True) for v in parts]


def point_label(values: dict[str, Any]) -> str:
    """The readable name of a grid point: `pool=max`, `optimizer=sgd-lr=0.01`."""
    label = "-".join(f"{option_name(k)}={format_value(v)}" for k, v in values.items())
    return safe_name(label, "")


@dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep: a grid point and a seed."""

    name: str                 # its directory name: `pool=max-seed=0`
    point: str                # the grid point without the seed: `pool=max`
    values: dict[str, Any]    # the grid values that make the point
    config: Config


@dataclass(frozen=True)
class Plan:
    keys: list[str]           # the grid keys, in order
    seeds: int
    runs: list[SweepRun]           # seed-major: every point's first seed comes first

    def to_json(self) -> dict:
        """sweep.json: the plan, and what a second command into its directory is checked
        against."""
        return {"identity": _identity(self), "keys": self.keys, "seeds": self.seeds,
                "runs": [{"name": r.name, "point": r.point, "values": r.values,
                          "seed": r.config.seed, "config": r.config.to_dict()}
                         for r in self.runs]}


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read a sweep TOML file into plan_sweep's arguments (model, dataset, seeds, train,
    grid, points), checking its shape."""
    raw = {field_name(k): v for k, v in load_toml(path).items()}
    unknown = [k for k in raw if k not in SWEEP_FILE_KEYS]
    if unknown:
        raise CnnlabError(f"sweep file {path}: unknown key '{unknown[0]}'"
                          f"{did_you_mean(unknown[0], SWEEP_FILE_KEYS)} (a sweep file has "
                          f"{', '.join(SWEEP_FILE_KEYS)}; fixed train options go in [train])")
    for key, kind in (("train", dict), ("grid", dict), ("points", list)):
        if key in raw and not isinstance(raw[key], kind):
            raise CnnlabError(f"sweep file {path}: '{key}' must be a "
                              f"{'table' if kind is dict else 'list of tables'}")
    if not all(isinstance(p, dict) for p in raw.get("points", [])):
        raise CnnlabError(f"sweep file {path}: 'points' must be a list of tables, "
                          "e.g. points = [{optimizer = \"sgd\", lr = 0.01}]")
    return raw


def _combinations(grid: dict[str, list[Any]], points: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    grid_keys = list(grid)
    overlap = {k for p in points for k in p} & set(grid_keys)
    if overlap:
        raise CnnlabError(f"'{option_name(sorted(overlap)[0])}' is both a grid key and a key "
                          "of the listed points; give it in one place")
    combos = [dict(zip(grid_keys, values)) for values in itertools.product(*grid.values())]
    return [point | combo for point in (points or [{}]) for combo in combos]


def plan_sweep(model: str | None, dataset: str | None, *,
               grid: dict[str, Any] | None = None, points: list[dict[str, Any]] | None = None,
               seeds: int = 1, train: dict[str, Any] | None = None,
               options: dict[str, Any] | None = None,
               say: Callable[[str], None] | None = None) -> Plan:
    """Every run of a sweep, each with its validated Config; nothing is trained.

    grid: key -> values (a cross product); points: explicit grid points; keys use '-' or '_'
    and values are typed as the Config fields. `model` and `dataset` may be grid keys.
    train: fixed options (as in a config file); options: overrides that beat them (the
    command line's), which must not name a grid key. A plan of more than MAX_RUNS runs is
    refused before anything is built; `say` is told the count of a large one. Raises
    CnnlabError on bad input."""
    grid = {_grid_key(k): v if isinstance(v, list) else [v] for k, v in (grid or {}).items()}
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise CnnlabError(f"seeds must be a positive integer, at most {MAX_SEEDS}, got "
                          f"{short(seeds)}")
    count = math.prod(map(len, grid.values())) * max(1, len(points or [])) * seeds
    if count > MAX_RUNS:
        raise CnnlabError(f"this sweep would train {count:,} runs ({count // seeds:,} points x "
                          f"{seeds} seed{'s' if seeds > 1 else ''}), more than the {MAX_RUNS:,} "
                          "a sweep may hold; give fewer grid values or seeds, or split it")
    if count >= 1000 and say is not None:  # checking each run's options takes a moment
        say(f"planning {count:,} runs")
    for key, values in grid.items():
        if not values:
            raise CnnlabError(f"grid {option_name(key)}: no values")
        grid[key] = [grid_value(key, v) for v in values]
        if len(set(map(format_value, grid[key]))) < len(values):
            raise CnnlabError(f"grid {option_name(key)}: a value is given twice")
    points = [{_grid_key(k): grid_value(_grid_key(k), v) for k, v in p.items()}
              for p in (points or [])]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    keys = list(dict.fromkeys([k for p in points for k in p] + list(grid)))
    for key in keys:
        if key in options:
            raise CnnlabError(f"--{option_name(key)} is a grid key of this sweep; "
                              "give its values in the grid")
    combos = _combinations(grid, points)
    runs: list[SweepRun] = []
    for seed_index in range(seeds):
        for values in combos:
            point_model, point_dataset = values.get("model", model), values.get("dataset", dataset)
            if not point_model or not point_dataset:
                raise CnnlabError("a sweep needs MODEL and DATASET (arguments, sweep file keys "
                                  "or grid keys)")
            overrides = options | {k: v for k, v in values.items()
                                   if k not in ("model", "dataset")}
            cfg = resolve(point_model, point_dataset, file_values=train, overrides=overrides)
            cfg = dataclasses.replace(cfg, seed=cfg.seed + seed_index)
            validate(cfg)  # the seeds after the first stay in range too
            label = point_label(values)
            name = f"{label}-seed={cfg.seed}" if label else f"seed={cfg.seed}"
            runs.append(SweepRun(name=name, point=label or "all", values=values, config=cfg))
    names = [r.name for r in runs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise CnnlabError(f"two grid points are both named {duplicate}; list each point once")
    return Plan(keys=keys, seeds=seeds, runs=runs)


def default_sweep_dir(plan: Plan, config_file: str | Path | None = None,
                      root: str | Path = "sweeps") -> Path:
    """sweeps/<sweep file name>, else sweeps/<model>-<dataset>-<grid keys>: the same sweep
    gets the same directory, so running it again resumes it."""
    if config_file:
        return Path(root) / Path(config_file).stem
    first = plan.runs[0].config
    parts = [first.model, first.dataset.removeprefix("folder:"),
             *(option_name(k) for k in plan.keys)]
    return Path(root) / safe_name("-".join(parts))


def run_sweep(plan: Plan, out: str | Path, *, progress: bool = True, jobs: int = 1,
              storage: str | None = None, study_name: str | None = None) -> dict:
    """Train every point of `plan` not yet trained, as workers of the sweep's Optuna study
    (see study.py), then write the results. The study lives in `storage` (default: a SQLite
    file in `out`) under `study_name` (default: the name of `out` and a digest of the plan,
    so that a sweep given more seeds or points is a study of its own, whose runs already
    trained count as done); the same command on other machines, with the same storage and
    `out` on a shared filesystem, adds workers. A sweep directory holds one sweep: a command
    whose fixed options or grid keys differ is refused; one with more seeds or grid values
    extends it (sweep.json lists every point, and the results cover them all).
    `jobs` > 1: that many worker processes on this machine. `progress` off (--quiet): no
    bars and no lines about the runs. Returns what write_results returns, with "refused":
    why each trial the study's storage held was refused (tampered with)."""
    say = functools.partial(say_line, "sweep") if progress else silent
    check_jobs(jobs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with sweep_lock(out):  # before training anything: refuse a directory of another sweep
            joined = _joined(out, plan)
            for run in plan.runs:  # a run there by hand, or of a sweep older than sweep.json's
                if is_finished(out / run.name) and (
                        why := config_difference(out / run.name, run.config)):
                    raise CnnlabError(f"{out / run.name} is a finished run of another sweep "
                                      f"({why}); choose another --out or remove it")
            write_json(out / SWEEP_FILE, joined.to_json())
    except OSError as e:
        raise CnnlabError(f"cannot create sweep directory {out}: {e.strerror or e}") from None
    where = Where.of(out, _plan_digest(plan), storage, study_name)
    study = Study(where.url, where.name, _plan_digest(plan),
                  points=[{RUN: r.name} for r in plan.runs])
    study.reopen([r.name for r in plan.runs if not is_finished(out / r.name)])
    try:
        if jobs > 1:
            _workers(plan, where, jobs, say)
        else:
            _work(plan, where, progress=progress, say=say)
    except BaseException:
        with contextlib.suppress(Exception):  # keep what finished readable
            write_results(out, study.refused())
        raise
    refused = study.refused()
    return write_results(out, refused) | {"refused": refused}


def sweep_lock(out: Path):
    """Held while a command reads and rewrites the sweep directory's own files (sweep.json,
    the results): two commands never interleave their changes."""
    return hold(out / SWEEP_LOCK)




def _identity(plan: Plan) -> dict:
    """What a sweep directory is a sweep of: its grid keys and every option that changes a
    result and is no grid key (model and dataset included; the seeds are its points)."""
    first = plan.runs[0].config.to_dict()
    return {"keys": plan.keys, "fixed": {k: v for k, v in first.items()
                                         if k in COMPARED and k not in plan.keys
                                         and k != "seed"}}


def _joined(out: Path, plan: Plan) -> Plan:
    """`plan` with the points that the sweep in `out` (its sweep.json) already holds; a sweep
    with other fixed options or grid keys is refused, naming the differences."""
    try:
        before = read_object(out / SWEEP_FILE)
        if before is None:
            return plan
        runs = [_stored_run(r) for r in before["runs"]] if "identity" in before else []
    except (DamagedFile, TypeError, KeyError) as e:
        why = e.what if isinstance(e, DamagedFile) else one_line(e, 80)
        raise CnnlabError(f"{out / SWEEP_FILE} is damaged ({why}); remove it to "
                          "start the sweep's plan again (its runs are kept)") from None
    if not runs:  # written by an earlier cnnlab: this command's plan replaces it
        return plan
    ours, theirs = _identity(plan), before["identity"]
    if ours != theirs:
        raise CnnlabError(f"{out} holds another sweep ({_differences(theirs, ours)}); give the "
                          "same options to extend it, or choose another --out")
    names = {r.name for r in runs}
    runs += [r for r in plan.runs if r.name not in names]
    return Plan(keys=plan.keys, seeds=max(plan.seeds, before.get("seeds", 1)), runs=runs)


def _differences(theirs: dict, ours: dict) -> str:
    """How this command's sweep differs from the one in the directory, in words."""
    if theirs["keys"] != ours["keys"]:
        return (f"grid keys {', '.join(map(option_name, theirs['keys'])) or 'none'}, this "
                f"command's {', '.join(map(option_name, ours['keys'])) or 'none'}")
    keys = sorted(set(theirs["fixed"]) | set(ours["fixed"]))
    changed = [f"--{option_name(k)} {format_value(theirs['fixed'].get(k))} there, "
               f"{format_value(ours['fixed'].get(k))} here" for k in keys
               if theirs["fixed"].get(k) != ours["fixed"].get(k)]
    return "; ".join(changed)


def _stored_run(entry: dict) -> SweepRun:
    """A run of sweep.json's list."""
    return SweepRun(name=entry["name"], point=entry["point"], values=entry["values"],
               config=Config(**with_defaults(entry["config"])))


def _plan_digest(plan: Plan) -> dict:
    """What makes two sweeps the same sweep: their runs, by name and configuration."""
    return {"sweep": [[r.name, {k: v for k, v in r.config.to_dict().items() if k in COMPARED}]
                      for r in plan.runs]}


def _work(plan: Plan, where: Where, *, progress: bool, say,
          slot: tuple[int, int] | None = None) -> None:
    """Be a worker of the sweep's study: take points and train them until none is left."""

    study = Study(where.url, where.name, _plan_digest(plan))
    work(study, SweepJob(plan, where, study, progress, say, slot), say)


@dataclass
class SweepJob(Job):
    """A sweep's trials: each names one point of the plan (its run directory)."""

    plan: Plan
    where: Where
    study: Any
    progress: bool
    say: Any
    slot: tuple[int, int] | None

    def __post_init__(self) -> None:
        self.index = {r.name: (i, r) for i, r in enumerate(self.plan.runs, 1)}

    def check(self, trial) -> tuple[int, SweepRun]:

        name = check_run_name(trial.user_attrs.get(RUN), self.where.out,
                              lambda n: n in self.index)
        i, run = self.index[name]
        point = _params(self.plan, run)
        for key, value in stored_params(trial).items():
            if key not in point[0] or type(value) is not type(point[0][key]) \
                    or value != point[0][key]:
                raise Refused(f"its parameter {shown(key)}={shown(value)} is not that of its "
                              f"point {name}")
        return i, run

    def run(self, trial, point: tuple[int, SweepRun]) -> tuple[str, float | None]:
        """Train (or continue, or recognise as done) the point's run; ("complete", best
        accuracy) or ("failed", None) - a divergence, or a run that cannot train (which
        stops every worker: a bad configuration is bad everywhere)."""
        i, run = point
        values, distributions = _params(self.plan, run)

        def record() -> None:  # the point, for Optuna's own tools
            for key, value in values.items():
                self.study.storage.set_trial_param(trial._trial_id, key, distributions[key]
                                                   .to_internal_repr(value), distributions[key])

        self.study.patient(record, "recording a trial's params")
        tag = f"[{i}/{len(self.plan.runs)}] {run.name}"
        cfg, job = on_slot(run.config, self.slot)
        state, summary = attempt(lambda: train_or_continue(
            self.where.out / run.name, cfg, tag, job, progress=self.progress, say=self.say),
            run.name, command="sweep", study=self.study, say=self.say, tag=tag)
        if summary is None:
            return state, None
        self.say(_finished(tag, summary))
        return state, _value(summary)


def _params(plan: Plan, run: SweepRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's grid values and seed as Optuna params, and their distributions (each key's
    values over the plan; the seeds' range)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    def param(value: Any) -> Any:  # Optuna's choices are numbers, text or booleans
        return value if isinstance(value, (bool, int, float, str)) else format_value(value)

    distributions: dict[str, Any] = {
        option_name(k): CategoricalDistribution(list(dict.fromkeys(
            param(r.values[k]) for r in plan.runs))) for k in plan.keys}
    seeds = [r.config.seed for r in plan.runs]
    distributions["seed"] = IntDistribution(min(seeds), max(seeds))
    values = {option_name(k): param(run.values[k]) for k in plan.keys} | {
        "seed": run.config.seed}
    return values, distributions


def _value(summary: dict) -> float:
    """A run's score for the study: the accuracy best.pt was chosen by."""
    return float(summary.get("best_val_acc") or summary["best_test_acc"])


def _finished(tag: str, s: dict) -> str:
    return (f"{tag}: final {s['final_test_acc']:.2f}%, {best_text(s)}, "
            f"{s['train_seconds']:.1f} s")


# ---- worker processes -----------------------------------------------------------------------

def _workers(plan: Plan, where: Where, jobs: int, say) -> None:
    """`jobs` worker processes of the study on this machine (study.run_workers), with the
    data decoded here first, once, rather than by N processes at once."""
    from .trainer import load_data

    datasets = {(c.dataset, c.data_dir, c.download, c.skip_bad_files, c.image_size): c
                for c in (run.config for run in plan.runs)}
    for cfg in datasets.values():
        load_data(cfg)
    run_workers(_work, (plan, where), jobs, say,
                "sweep stopped; run the same command again to continue (finished runs are "
                "kept, the stopped ones continue from their checkpoints)")


# ---- results: mean and spread over seeds ----------------------------------------------------

def _csv_number(value: float | None, digits: int) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{max(digits, 2) + 2}f}"


def _results_csv(keys: list[str], rows: list[dict]) -> str:
    """results.csv's text: a point per line with its grid values (`keys`), its number of
    seeds and diverged runs, and the mean and std of every metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["point", *keys, "seeds", "diverged",
                     *(f"{key}_{stat}" for key, _, _ in METRICS for stat in ("mean", "std"))])
    for row in rows:
        writer.writerow([row["label"], *(format_value(row["config"][k]) for k in keys),
                         row["n"], row["diverged"],
                         *(_csv_number(row[f"{key}_{stat}"], digits)
                           for key, _, digits in METRICS for stat in ("mean", "std"))])
    return buffer.getvalue()


def _runs_section(runs: list[SweepRun], summaries: dict[str, dict], diverged: dict[str, str],
                  titles: dict[str, str]) -> list[str]:
    """results.md's lines listing `runs`: each finished one (its summary in `summaries`) with
    its metrics, each diverged one with its error; `titles` are the shown metrics' titles."""
    def run_row(r: SweepRun) -> list[str]:
        if r.name in diverged:
            return [f"[{r.name}]({r.name}/)", str(r.config.seed),
                    diverged[r.name], "-", "-", "-", "-"]
        s = summaries[r.name]
        return [f"[{r.name}]({r.name}/)", str(r.config.seed), f"{s['final_test_acc']:.2f}",
                f"{s['best_test_acc']:.2f}", format_epochs(metric(s, "best_epochs_done")),
                f"{s['train_seconds']:.1f}", f"{s['images_per_second']:,.0f}"]

    return ["## Runs", "", md_table(
        ["run", "seed", "final test acc (%)", titles.get("best_test_acc", "best on test (%)"),
         titles.get("best_epochs_done", "epochs to best"), "train time (s)", "images/s"],
        [run_row(r) for r in runs]), ""]


def write_results(out: str | Path, refused: list[str] = ()) -> dict:
    """results.csv, results.md, accuracy.png, loss.png and comparison.png (each point's runs,
    their mean and its confidence interval) of the finished runs of every point sweep.json
    lists - those of this command and of the commands that extended the sweep - (runs that
    diverged are listed and counted, but left out of the statistics and plots; a run counts
    only with its point's configuration; `refused`: why trials of the study were refused).
    Returns {"out", "rows", "verdict", "finished", "diverged", "total"}."""
    out = Path(out)
    with sweep_lock(out):
        plan = _stored_plan(out)
        return _write_results(out, plan, refused)


def _ran(run_dir: Path, config: dict) -> dict:
    """`config` with what its run resolved (device, precision, channels-last), as the run's
    config.json records it."""
    try:
        resolved = (read_object(run_dir / CONFIG) or {}).get("resolved")
    except DamagedFile:
        resolved = None
    return config | {"resolved": resolved} if isinstance(resolved, dict) else config


def _stored_plan(out: Path) -> Plan:
    info = read_object(out / SWEEP_FILE, missing_ok=False)
    return Plan(keys=info["keys"], seeds=info["seeds"],
                runs=[_stored_run(r) for r in info["runs"]])


def _write_results(out: Path, plan: Plan, refused: list[str]) -> dict:

    finished = [r for r in plan.runs if (out / r.name / SUMMARY).is_file()
                and config_difference(out / r.name, r.config) is None]
    done = {r.name for r in finished}
    diverged = {r.name: error for r in plan.runs if r.name not in done
                and (error := diverged_error(out / r.name)) is not None}
    entries = [(r.point, r.config.to_dict(), read_object(out / r.name / SUMMARY, missing_ok=False))
               for r in finished]
    order = list(dict.fromkeys(r.point for r in plan.runs))
    rows = sorted(aggregate(entries, [(r.point, r.config.to_dict()) for r in plan.runs
                                      if r.name in diverged]),
                  key=lambda row: order.index(row["label"]))
    text = verdict(rows, plan.keys)
    columns = shown_metrics(rows)

    table = _results_csv(plan.keys, rows)
    atomic_write(out / RESULTS_CSV, lambda f: f.write(table.encode()))

    # the fixed settings as they ran (config.json's "resolved": fp32 (auto)) where runs finished
    configs = [_ran(out / r.name, r.config.to_dict()) for r in finished] or \
        [r.config.to_dict() for r in plan.runs]
    models = sorted({model_label(c["model"]) for c in configs})
    datasets = sorted({c["dataset"] for c in configs})
    diverged_note = (f" ({len(diverged)} more diverged: their loss became NaN; they are left "
                     "out of the mean and std)" if diverged else "")
    lines = [f"# Sweep: {', '.join(models)} on {', '.join(datasets)}", "",
             f"{len(finished)} of {len(plan.runs)} runs finished{diverged_note}; {plan.seeds} "
             f"seed{'s' if plan.seeds > 1 else ''} per point. Mean ± sample standard deviation "
             "over seeds; accuracies in % on the test split; train time excludes evaluation.",
             "", f"Fixed settings: {fixed_settings(configs, skip=tuple(plan.keys))}.", "",
             md_table([*([option_name(k) for k in plan.keys] or ["point"]), "seeds",
                        *(["diverged"] if diverged else []),
                        *(title for _, title, _ in columns)],
                       [[*([model_label(row["config"][k]) if k == "model"
                            else format_value(row["config"][k]) for k in plan.keys]
                           or [row["label"]]),
                         str(row["n"]), *([str(row["diverged"])] if diverged else []),
                         *(mean_std_text(row, key, digits) for key, _, digits in columns)]
                        for row in rows]), ""]
    note = selection_note(rows)
    if note:
        lines += [note, ""]
    if text:
        lines += [f"**{text}**", ""]
    if finished:
        points = [r.point for r in finished]
        plot_overlay([out / r.name for r in finished], points, out)
        plot_comparison([s for _, _, s in entries], points, out / COMPARISON_PLOT)
        lines += ["![Test accuracy of every point](accuracy.png)", "",
                  "![Loss of every point](loss.png)", "",
                  "![Final and best test accuracy of each point's runs, their mean and 95% "
                  "confidence interval](comparison.png)", ""]
    summaries = {r.name: s for r, (_, _, s) in zip(finished, entries)}
    shown = [r for r in plan.runs if r.name in done or r.name in diverged]
    lines += _runs_section(shown, summaries, diverged,
                           {key: title for key, title, _ in columns})
    lines += refused_section(refused)
    atomic_write(out / RESULTS_MD, lambda f: f.write("\n".join(lines).encode()))
    return {"out": str(out), "rows": rows, "verdict": text, "finished": len(finished),
            "diverged": len(diverged), "total": len(plan.runs)}
