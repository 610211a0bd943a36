"""Searches: train options over ranges, trials chosen on validation accuracy, hopeless ones
stopped early.

    cnnlab tune lenet5 mnist --space lr=0.01:0.5:log --space batch-size=32,64,128 \\
        --trials 30 --val-split 0.1

A search is an Optuna study in the storage sweeps use (study.py), run by Optuna's own loop
(`Study.optimize`): each worker asks the sampler for a trial's values, trains it as an
ordinary run directory `trial-NNNN` under the tune directory, and feeds every evaluated
epoch's validation accuracy to the pruner, which may stop the run there (its directory
stays, with the epochs it trained and no summary.json). The objective is the run's best
validation accuracy - the one best.pt was chosen on - never the test accuracy: choosing on
test is optimistic (docs/training.md: "Choosing the best checkpoint honestly").

Optuna's loop records heartbeats; a worker that dies leaves its trial silent, the next worker
to look fails it and the storage queues it again with the same values and the same run
directory (a `run` user attribute), and whoever takes it continues that run from its
checkpoint. Ctrl-C queues the stopped trial again the same way. `--trials` counts trials
over all workers, a trial queued again once.

The tune directory holds the trial runs, study.db (the default storage), and the results
(tune_results.py): tune.json, results.md, best.toml (the best trial's options: `cnnlab train
MODEL DATASET --config best.toml`), history.png and importance.png.

Optuna is imported by the functions that run or read a search only.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import nearest_option, short, typed_value
from .config import resolve
from .errors import (
    CnnlabError,
    shown,
    unknown_choice,
)
from .files import safe_name, write_json
from .options import (
    ARGUMENT,
    COMPARED,
    MACHINE,
    OPTIONS,
    RUNTIME,
    Config,
    field_name,
    format_value,
    option_name,
)
from .progress import say as say_line
from .progress import silent
from .results import metric
from .runs import RESULTS_MD, SUMMARY, TUNE_FILE, DamagedFile, read_object
from .study import REFUSED, RUN, Study, run_workers
from .tune_results import (
    TRIAL_NAME,
    epochs_text,
    retried,
    short_value,
    states,
    write_results,
)
from .worker import (
    Job,
    Refused,
    Where,
    attempt,
    check_jobs,
    check_run_name,
    on_slot,
    stored_params,
    train_or_continue,
    work,
)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "time", "none")
MAX_TRIALS = 100_000
# Complete trials before the median pruner judges: fewer give it no median worth the name.
PRUNER_STARTUP = 5


@dataclass(frozen=True)
class Dim:
    """One searched option: a range (`low` to `high`, on a log scale with `log`) or a list
    of `values`."""

    key: str                      # the Config field
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple = ()

    @property
    def name(self) -> str:
        """Its name as Optuna's parameter, in tables and figures: the option's."""
        return option_name(self.key)

    def suggest(self, trial) -> Any:
        if self.values:
            return trial.suggest_categorical(self.name, list(self.values))
        if OPTIONS[self.key].type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def holds(self, value: Any) -> bool:
        """Whether `value` (read from a study: any type) is one this dimension suggests."""
        if self.values:
            return any(type(value) is type(v) and value == v for v in self.values)
        kinds = (int,) if OPTIONS[self.key].type == "int" else (int, float)
        return (type(value) in kinds and math.isfinite(value)
                and self.low <= value <= self.high)

    def describe(self) -> str:
        if self.values:
            return f"{self.name} one of {', '.join(map(format_value, self.values))}"
        return (f"{self.name} from {format_value(self.low)} to {format_value(self.high)}"
                + (" (log scale)" if self.log else ""))

    def to_json(self) -> dict:
        return {"option": self.name, "low": self.low, "high": self.high, "log": self.log,
                "values": list(self.values)}


def _space_key(text: str, key: str) -> str:
    """A --space key -> the Config field it searches, or the one line why it cannot be."""
    name = field_name(key)
    searchable = [option_name(k) for k, o in OPTIONS.items() if _searchable(o)]
    if name == "seed":
        raise CnnlabError("--space seed: a search over seeds finds the luckiest seed, not a "
                          "better recipe; fix it with --seed")
    if name not in OPTIONS:
        raise CnnlabError(f"--space '{text}': unknown option '{key.strip()}'"
                          f"{nearest_option(key, searchable)} (searchable: "
                          f"{', '.join(searchable)})")
    o = OPTIONS[name]
    if o.kind == ARGUMENT:
        raise CnnlabError(f"--space {name}: a search compares recipes of one MODEL on one "
                          "DATASET; run a search for each")
    if name == "val_split":
        raise CnnlabError("--space val-split: trials are compared on their validation "
                          "accuracy, so they must share one validation split; fix it with "
                          "--val-split")
    if o.role in (RUNTIME, MACHINE):
        raise CnnlabError(f"--space {option_name(name)}: it fits a run to the machine or "
                          "says what it records, not what it learns; search recipe options")
    if not _searchable(o):
        raise CnnlabError(f"--space {option_name(name)}: it is neither a number nor one of "
                          "a list of choices; it cannot be searched")
    return name


def _searchable(o) -> bool:
    return (o.kind != ARGUMENT and o.role not in (RUNTIME, MACHINE) and o.name not in
            ("seed", "val_split") and (o.type in ("int", "float", "bool") or bool(o.choices)))


def parse_space(text: str) -> Dim:
    """`KEY=LOW:HIGH`, `KEY=LOW:HIGH:log` or `KEY=A,B,C` (';' between values that hold
    commas: `augment=none;crop,flip`) -> a Dim, its values typed as the option's and inside
    its limits; anything else is one line."""
    key, sep, spec = text.partition("=")
    if not sep or not key.strip() or not spec.strip():
        raise CnnlabError(f"--space '{text}': write KEY=LOW:HIGH, KEY=LOW:HIGH:log or "
                          "KEY=A,B,C")
    name = _space_key(text, key)
    o, what = OPTIONS[name], f"--space {option_name(name)}={spec.strip()}"
    if ":" not in spec:
        parts = [p.strip() for p in spec.split(";" if ";" in spec else ",")]
        if "" in parts:
            raise CnnlabError(f"{what}: an empty value")
        values = tuple(typed_value(name, p, what=what, text=True) for p in parts)
        for value in values:
            _check(name, value, what)
        if len(values) < 2:
            raise CnnlabError(f"{what}: give two values or more, or fix it with "
                              f"--{option_name(name)} {parts[0]}")
        if len(set(map(format_value, values))) < len(values):
            raise CnnlabError(f"{what}: a value is given twice")
        return Dim(name, values=values)
    if o.type not in ("int", "float"):
        raise CnnlabError(f"{what}: {option_name(name)} takes one of its values, not a range; "
                          f"write {option_name(name)}=A,B,...")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
        raise CnnlabError(f"{what}: write LOW:HIGH or LOW:HIGH:log")
    low, high = (typed_value(name, p, what=what, text=True) for p in parts[:2])
    for value in (low, high):
        _check(name, value, what)
    if low >= high:
        raise CnnlabError(f"{what}: LOW must be below HIGH")
    log = len(parts) == 3
    if log and low <= 0:
        raise CnnlabError(f"{what}: a log scale needs LOW above 0")
    return Dim(name, low=low, high=high, log=log)


def _check(name: str, value: Any, what: str) -> None:
    """Refuse a value the option cannot take (its limits, its choices, a finite number)."""
    o = OPTIONS[name]
    if isinstance(value, float) and not math.isfinite(value):
        raise CnnlabError(f"{what}: --{option_name(name)} must be a finite number, got {value}")
    if o.limits and (problem := o.limits.problem(value)):
        raise CnnlabError(f"{what}: --{option_name(name)} must be {problem}, got "
                          f"{short(value)}")
    if o.choices and value not in o.choices:
        raise CnnlabError(f"{what}: {unknown_choice(option_name(name), value, o.choices)}")


@dataclass(frozen=True)
class Search:
    """A search, checked and ready to run: every trial is `options` (the command line's)
    with the space's values on top, resolved as `cnnlab train` would."""

    base: Config                  # the recipe with no value searched (options alone)
    options: dict[str, Any]
    space: tuple[Dim, ...]
    trials: int
    sampler: str
    pruner: str
    # --target: the score is the training seconds (to be minimised) of the trials whose
    # final validation accuracy reaches it; None: the best validation accuracy (maximised)
    target: float | None = None

    @property
    def direction(self) -> str:
        """Optuna's direction of the score: accuracy up, or with --target time down."""
        return "maximize" if self.target is None else "minimize"

    def config(self, values: dict[str, Any]) -> Config:
        return resolve(self.base.model, self.base.dataset, overrides=self.options | values)

    def plan(self) -> dict:
        """What makes two searches the same search: model, dataset, fixed recipe, space (not
        the budget, the sampler or the pruner: a search may be continued with others)."""
        keys = {d.key for d in self.space}
        target = {} if self.target is None else {"target": self.target}
        return {"tune": {"fixed": {k: v for k, v in self.base.to_dict().items()
                                   if k in COMPARED and k not in keys},
                         "space": [d.to_json() for d in self.space], **target}}

    @property
    def max_epochs(self) -> int:
        """The most epochs a trial trains in (the last maybe in part): Hyperband's budget."""
        epochs = next((d for d in self.space if d.key == "epochs"), None)
        most = self.base.epochs if epochs is None else max(epochs.values or (epochs.high,))
        return math.ceil(most)


def plan_tune(model: str, dataset: str, space: list[str], *,
              options: dict[str, Any] | None = None, trials: int = 20, sampler: str = "tpe",
              pruner: str | None = None, target: float | None = None) -> Search:
    """Check a search (every --space value resolved with the fixed options, as a trial would
    be) before anything is written; raises CnnlabError with one line. `pruner` None: median,
    or time with a `target`."""
    if not space:
        raise CnnlabError("tune needs at least one --space KEY=SPEC")
    dims = [parse_space(text) for text in space]
    keys = [d.key for d in dims]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:
        raise CnnlabError(f"--space {option_name(twice)} is given twice; give it once")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for key in keys:
        if key in options:
            raise CnnlabError(f"--{option_name(key)} is searched (--space {option_name(key)}=...); "
                              "leave the option out")
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= MAX_TRIALS:
        raise CnnlabError(f"--trials must be a positive integer, at most {MAX_TRIALS:,}, got "
                          f"{short(trials)}")
    if sampler not in SAMPLERS:
        raise CnnlabError(unknown_choice("sampler", sampler, SAMPLERS))
    pruner = _check_target(target, pruner)
    base = resolve(model, dataset, overrides=options)
    for d in dims:
        for value in d.values or (d.low, d.high):
            try:
                resolve(model, dataset, overrides=options | {d.key: value})
            except CnnlabError as e:
                raise CnnlabError(f"--space {d.name}: {e}") from None
    if sampler == "grid":
        ranged = next((d for d in dims if not d.values), None)
        if ranged:
            raise CnnlabError(f"--sampler grid tries lists of values only; give {ranged.name} "
                              "as A,B,C, or use --sampler tpe or random")
        trials = min(trials, math.prod(len(d.values) for d in dims))  # the grid, once
    folder = Path(base.dataset.removeprefix("folder:")).expanduser()
    if base.val_split == 0 and not (base.dataset.startswith("folder:")
                                    and (folder / "val").is_dir()):
        raise CnnlabError("tune chooses trials on validation accuracy and this search has no "
                          "validation split: choosing on the test split would make the best "
                          "trial's test accuracy optimistic (docs/training.md: Choosing the best "
                          "checkpoint honestly); pass --val-split 0.1")
    return Search(base, options, tuple(dims), trials, sampler, pruner, target)


def _check_target(target: float | None, pruner: str | None) -> str:
    """The pruner of a search with this --target (None: none), or the one line why the two
    do not go together."""
    if pruner is not None and pruner not in PRUNERS:
        raise CnnlabError(unknown_choice("pruner", pruner, PRUNERS))
    if target is None:
        if pruner == "time":
            raise CnnlabError("--pruner time stops trials slower than the fastest that "
                              "reached --target; give --target ACC, or another pruner")
        return pruner or "median"
    if isinstance(target, bool) or not isinstance(target, (int, float)) \
            or not 0 < target <= 100:
        raise CnnlabError(f"--target is a validation accuracy in percent, above 0 and at "
                          f"most 100, got {short(target)}")
    if pruner in ("median", "hyperband"):
        raise CnnlabError(f"--pruner {pruner} compares validation accuracies, and with "
                          "--target a trial is scored by its time; use --pruner time (the "
                          "default with --target) or none")
    return pruner or "time"


def default_tune_dir(search: Search, root: str | Path = "tunes") -> Path:
    """tunes/<model>-<dataset>-<searched options>: the same search gets the same directory,
    so running it again continues it."""
    parts = [search.base.model, search.base.dataset.removeprefix("folder:"),
             *(d.name for d in search.space)]
    return Path(root) / safe_name("-".join(parts))


def run_tune(search: Search, out: str | Path, *, progress: bool = True, jobs: int = 1,
             storage: str | None = None, study_name: str | None = None) -> dict:
    """Run the search in `out` until --trials trials have run, as workers of its Optuna
    study (in `storage`, default a SQLite file in `out`, under `study_name`, default the
    directory's name and a digest of the plan), then write the results. `jobs` > 1: that
    many worker processes here; the same command elsewhere, with a shared storage and `out`,
    adds workers. Running it again continues the search (more --trials: more trials).
    Returns what write_results returns."""
    check_jobs(jobs)
    say = functools.partial(say_line, "tune") if progress else silent
    out = Path(out)
    info = {"model": search.base.model, "dataset": search.base.dataset,
            "plan": search.plan()}
    if (out / TUNE_FILE).is_file():
        try:
            same = (read_object(out / TUNE_FILE) or {}).get("plan") == info["plan"]
        except DamagedFile:
            same = False
        if not same:
            raise CnnlabError(f"{out} holds another search (other model, dataset, fixed "
                              "options or space, or a damaged tune.json); choose another "
                              "--out or remove it")
    elif out.is_dir() and any(out.iterdir()):
        raise CnnlabError(f"{out} is not empty and holds no search; choose another --out or "
                          "empty it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / TUNE_FILE).is_file():
            write_json(out / TUNE_FILE, info)
    except OSError as e:
        raise CnnlabError(f"cannot create tune directory {out}: {e.strerror or e}") from None
    where = Where.of(out, search.plan(), storage, study_name)
    # created here once (the workers open it); a stop an earlier worker asked for is lifted
    Study(where.url, where.name, search.plan(), direction=search.direction).reopen([])
    try:
        if jobs > 1:
            _workers(search, where, jobs, say)
        else:
            _work(search, where, progress=progress, say=say)
    except BaseException:
        with contextlib.suppress(Exception):  # keep what the trials did readable
            write_results(out, search, where)
        raise
    info = write_results(out, search, where)
    if info["best"] is None:
        what = ("completed" if search.target is None else
                f"reached {search.target:g}% on validation")
        raise CnnlabError(f"no trial of the search {what} ({states(info['rows'])}); "
                          f"nothing to choose from: see {out / RESULTS_MD}")
    return info


def _spent(trials: list) -> int:
    """Trials begun, a trial queued again (its worker died or was stopped) counted once, a
    refused one (its stored values failed the check) not at all."""

    return len([t for t in trials if REFUSED not in t.system_attrs]) - len(retried(trials))


def _sampler(search: Search, seed: int | None):
    import optuna

    if search.sampler == "grid":
        return optuna.samplers.GridSampler({d.name: list(d.values) for d in search.space},
                                           seed=seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # with --target, TPE models the trials below it as infeasible (their constraint, see
    # SHORTFALL, is above 0: Optuna's constrained TPE)
    return optuna.samplers.TPESampler(seed=seed)


# The constraint of a --target trial: the target minus its final validation accuracy (or
# the last, where it was pruned), in points (<= 0: it reached the target, feasible)
SHORTFALL = "shortfall"


def _time_pruned(out: Path, search: Search, record: dict) -> str | None:
    """Why a --target trial stops at this evaluation (`record`): it has trained longer than
    the fastest trial that reached the target, so it cannot beat it; else None. The fastest
    is read from the trials' own summaries in `out`, not from values anyone may store."""
    if search.pruner != "time":
        return None
    best = math.inf
    for path in out.glob(f"trial-*/{SUMMARY}"):
        with contextlib.suppress(DamagedFile, ValueError, KeyError, TypeError):
            summary = read_object(path, missing_ok=False)
            if summary["final_val_acc"] >= search.target:
                best = min(best, float(summary["train_seconds"]))
    if record["train_seconds"] < best:
        return None
    return (f"pruned after epoch {record['epoch']}: {record['train_seconds']:.1f} s of "
            f"training, longer than the fastest trial that reached {search.target:g}% "
            f"({best:.1f} s)")


def _sampler_seed(seed: int, trials_before: int, slot: int, shared: bool) -> int | None:
    """A worker's sampler seed, from --seed, the trials the study held when the worker began
    and its --jobs slot: one worker suggests the same trials again, and neither the other
    --jobs workers nor a search continued later repeat its suggestions. With --storage
    (workers on other machines, which start alike) none: seeded alike, they would suggest
    the same trials."""
    if shared:
        return None
    import numpy as np

    return int(np.random.SeedSequence([seed, trials_before, slot]).generate_state(1)[0])


def _pruner(search: Search):
    import optuna

    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search.max_epochs)
    return optuna.pruners.NopPruner()  # "time" is judged by _trial itself


def _work(search: Search, where, *, progress: bool, say,
          slot: tuple[int, int] | None = None) -> None:
    """Be a worker of the search's study: run trials until the budget is spent and no other
    worker runs a trial (whose worker might still die and leave it to us), or until a worker
    stops the search."""

    study = Study(where.url, where.name, search.plan(), direction=search.direction,
                  pruner=_pruner(search))
    study.study.sampler = _sampler(search, _sampler_seed(
        search.base.seed, len(study.study.get_trials(deepcopy=False)),
        slot[0] if slot else 0, where.shared))
    work(study, SearchJob(search, where, study, progress, say, slot), say)


@dataclass
class SearchJob(Job):
    """A search's trials: new ones asked of the sampler while the budget lasts, and trials
    queued again (a dead or stopped worker's), which continue their run."""

    search: Search
    where: Any
    study: Any
    progress: bool
    say: Any
    slot: tuple[int, int] | None

    def new_trial(self, study) -> Any:
        import warnings

        def ask():
            if _spent(study.study.get_trials(deepcopy=False)) >= self.search.trials:
                return None
            with warnings.catch_warnings():  # "heartbeats are for Study.optimize": ours beat
                warnings.simplefilter("ignore")
                return study.study.ask()

        return study.patient(ask, "starting a trial")

    def check(self, trial) -> str:
        """The trial's run name: its own, or for a trial queued again the name of the trial
        it stands for; its stored params must lie inside the searched space."""

        dims = {d.name: d for d in self.search.space}
        for key, value in stored_params(trial).items():
            if key not in dims:
                raise Refused(f"its parameter {shown(key)} is not searched")
            if not dims[key].holds(value):
                raise Refused(f"its parameter {key}={shown(value)} is outside the searched "
                              f"space ({dims[key].describe()})")
        if RUN not in trial.user_attrs:
            return f"trial-{trial.number:04d}"
        history = trial.system_attrs.get("retry_history")
        first = history[0] if isinstance(history, list) and history else None
        own = f"trial-{first:04d}" if type(first) is int and 0 <= first < 10**9 else None
        return check_run_name(trial.user_attrs[RUN], self.where.out,
                              lambda name: name == own and bool(TRIAL_NAME.fullmatch(name)))

    def run(self, trial, name: str) -> tuple[str, float | None]:
        """Train the trial's run - or continue it, for a trial queued again - and return
        ("complete", its score), ("pruned", None) where the pruner stops it, or ("failed",
        None) where its loss became NaN or it cannot train (which stops every worker: a bad
        configuration is bad everywhere)."""
        import optuna

        search, say = self.search, self.say

        def suggest() -> dict[str, Any]:
            trial.set_user_attr(RUN, name)
            return {d.key: d.suggest(trial) for d in search.space}

        values = self.study.patient(suggest, "recording a trial's params")
        cfg, job = on_slot(search.config(values), self.slot)
        shown_values = " ".join(f"{d.name}={short_value(values[d.key])}"
                                for d in search.space)
        try:
            state, summary = attempt(lambda: train_or_continue(
                self.where.out / name, cfg, f"{name} ({shown_values})", job,
                progress=self.progress, say=say, on_eval=self._judge(trial, cfg)),
                name, command="tune", study=self.study, say=say)
        except optuna.TrialPruned as e:
            say(f"{name}: {e}")
            return "pruned", None
        if summary is None:
            return state, None
        return state, self._score(trial, name, summary)

    def _judge(self, trial, cfg: Config):
        """The run's on_eval: report each evaluation to the pruner, which may stop it."""
        import optuna

        search, last = self.search, math.ceil(cfg.epochs)

        patient = self.study.patient

        def on_eval(record: dict) -> None:
            if search.target is not None:  # a constraint is set once: where the trial ends
                if record["epoch"] < last and (why := _time_pruned(self.where.out, search,
                                                                   record)):
                    patient(lambda: trial.set_constraint(SHORTFALL, search.target
                                                         - record["val_acc"]),
                            "recording a trial's constraint")
                    raise optuna.TrialPruned(why)
                return

            def judged() -> bool:
                trial.report(record["val_acc"], record["epoch"])
                return trial.should_prune()

            # the last evaluation ends the trial anyway
            if patient(judged, "reporting to the pruner") and record["epoch"] < last:
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} (validation "
                                         f"{record['val_acc']:.2f}%)")

        return on_eval

    def _score(self, trial, name: str, summary: dict) -> float:
        """The finished trial's score, said in a line."""
        search, say = self.search, self.say
        if search.target is None:
            say(f"{name}: best validation {summary['best_val_acc']:.2f}% (test "
                f"{summary['test_acc_at_best']:.2f}% of its best.pt), "
                f"{epochs_text(metric(summary, 'epochs_done'))}, {summary['train_seconds']:.1f} s")
            return float(summary["best_val_acc"])
        self.study.patient(lambda: trial.set_constraint(
            SHORTFALL, search.target - summary["final_val_acc"]), "recording a trial's constraint")
        reached = "reached" if summary["final_val_acc"] >= search.target else "below"
        say(f"{name}: {summary['train_seconds']:.1f} s of training, final validation "
            f"{summary['final_val_acc']:.2f}% ({reached} the target {search.target:g}%; test "
            f"{summary['final_test_acc']:.2f}%), {epochs_text(metric(summary, 'epochs_done'))}")
        return float(summary["train_seconds"])


# ---- worker processes -----------------------------------------------------------------------

def _workers(search: Search, where, jobs: int, say) -> None:
    """`jobs` worker processes of the study on this machine (study.run_workers), with the
    data decoded here first, once."""
    from .trainer import load_data

    load_data(search.base)
    run_workers(_work, (search, where), jobs, say,
                "search stopped; run the same command again to continue (finished trials are "
                "kept, the stopped ones continue from their checkpoints)")
