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
test is optimistic (README: "Choosing the best checkpoint honestly").

Optuna's loop records heartbeats; a worker that dies leaves its trial silent, the next worker
to look fails it and the storage queues it again with the same values and the same run
directory (a `run` user attribute), and whoever takes it continues that run from its
checkpoint. Ctrl-C queues the stopped trial again the same way. `--trials` counts trials
over all workers, a trial queued again once.

The tune directory holds the trial runs, study.db (the default storage), tune.json (the plan
and, once written, every trial's outcome, which reports read), results.md, best.toml (the
best trial's options: `cnnlab train MODEL DATASET --config best.toml`), history.png and
importance.png.

Optuna is imported by the functions that run or read a search only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    ARGUMENT,
    COMPARED,
    MACHINE,
    OPTIONS,
    RUNTIME,
    Config,
    applies,
    field_name,
    format_value,
    nearest_option,
    option_name,
    resolve,
    short,
    typed_value,
)
from .errors import (
    CnnlabError,
    Interrupted,
    TrainingDiverged,
    failure_message,
    unknown_choice,
)
from .files import atomic_write, read_json, safe_name, write_json
from .progress import say as say_line
from .progress import silent
from .results import diverged_error, fixed_settings, format_epochs, md_table, metric
from .runs import read_metrics
from .worker import (
    Job,
    Refused,
    check_run_name,
    on_slot,
    refused_section,
    shown,
    stored_params,
    train_or_continue,
    work,
)

TUNE_FILE = "tune.json"   # in the tune directory: the plan, then every trial's outcome
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "time", "none")
MAX_TRIALS = 100_000
# Complete trials before the median pruner judges: fewer give it no median worth the name.
PRUNER_STARTUP = 5
# Complete trials before parameter importances (over fewer they say nothing).
IMPORTANCE_TRIALS = 4


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
                          "trial's test accuracy optimistic (README: Choosing the best "
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
    from .study import Study, default_storage, digest
    from .sweep import MAX_JOBS, Where

    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise CnnlabError(f"--jobs must be a positive integer, at most {MAX_JOBS}, got "
                          f"{short(jobs)}")
    say = functools.partial(say_line, "tune") if progress else silent
    out = Path(out)
    info = {"model": search.base.model, "dataset": search.base.dataset,
            "plan": search.plan()}
    if (out / TUNE_FILE).is_file():
        try:
            same = read_json(out / TUNE_FILE).get("plan") == info["plan"]
        except (OSError, ValueError, AttributeError):
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
    url = storage or default_storage(out)
    where = Where(url, study_name or f"{out.resolve().name}-{digest(search.plan())[:8]}", out)
    # created here once (the workers open it); a stop an earlier worker asked for is lifted
    Study(url, where.name, search.plan(), direction=search.direction).reopen([])
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
        raise CnnlabError(f"no trial of the search {what} ({_states(info['rows'])}); "
                          f"nothing to choose from: see {out / 'results.md'}")
    return info


def _retried(trials: list) -> set[int]:
    """The numbers of the trials that were queued again (a later trial stands for each)."""
    return {n for t in trials if isinstance(history := t.system_attrs.get("retry_history"),
                                            list) for n in history if type(n) is int}


def _spent(trials: list) -> int:
    """Trials begun, a trial queued again (its worker died or was stopped) counted once, a
    refused one (its stored values failed the check) not at all."""
    from .study import REFUSED

    return len([t for t in trials if REFUSED not in t.system_attrs]) - len(_retried(trials))


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
    for path in out.glob("trial-*/summary.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            summary = read_json(path)
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


def _shared(where) -> bool:
    """Whether the study lives in a storage given with --storage: one other machines may
    share."""
    from .study import default_storage

    return where.url != default_storage(where.out)


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
    from .study import Study

    study = Study(where.url, where.name, search.plan(), direction=search.direction,
                  pruner=_pruner(search))
    study.study.sampler = _sampler(search, _sampler_seed(
        search.base.seed, len(study.study.get_trials(deepcopy=False)),
        slot[0] if slot else 0, _shared(where)))
    work(study, SearchJob(search, where, study, progress, say, slot), say)


TRIAL_NAME = re.compile(r"trial-(\d{4,9})")  # a trial's run: trial-0000, trial-0001, ...


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
        from .study import RUN

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

        from .study import RUN

        search, say = self.search, self.say
        def suggest() -> dict[str, Any]:
            trial.set_user_attr(RUN, name)
            return {d.key: d.suggest(trial) for d in search.space}

        values = self.study.patient(suggest, "recording a trial's params")
        cfg, job = on_slot(search.config(values), self.slot)
        shown_values = " ".join(f"{d.name}={_short_value(values[d.key])}"
                                for d in search.space)
        try:
            summary = train_or_continue(self.where.out / name, cfg, f"{name} ({shown_values})",
                                        job, progress=self.progress, say=say,
                                        on_eval=self._judge(trial, cfg))
        except optuna.TrialPruned as e:
            say(f"{name}: {e}")
            return "pruned", None
        except TrainingDiverged as e:
            say(f"{name}: diverged ({e}); going on with the other trials")
            return "failed", None
        except Interrupted as e:
            raise Interrupted(f"search stopped during {name}; run the same command again to "
                              "continue (finished trials are kept, that one continues from "
                              "its checkpoint)", e.signum) from None
        except Refused:
            raise
        except (CnnlabError, OSError, MemoryError, RuntimeError) as e:
            message = failure_message(e)
            if message is None:
                raise
            self.study.stop_all(f"{name}: {message}")
            return "failed", None
        return "complete", self._score(trial, name, summary)

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
                f"{_epochs(metric(summary, 'epochs_done'))}, {summary['train_seconds']:.1f} s")
            return float(summary["best_val_acc"])
        self.study.patient(lambda: trial.set_constraint(
            SHORTFALL, search.target - summary["final_val_acc"]), "recording a trial's constraint")
        reached = "reached" if summary["final_val_acc"] >= search.target else "below"
        say(f"{name}: {summary['train_seconds']:.1f} s of training, final validation "
            f"{summary['final_val_acc']:.2f}% ({reached} the target {search.target:g}%; test "
            f"{summary['final_test_acc']:.2f}%), {_epochs(metric(summary, 'epochs_done'))}")
        return float(summary["train_seconds"])


def _epochs(value: float) -> str:
    return f"{format_epochs(value)} epoch{'' if value == 1 else 's'}"


def _short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


# ---- worker processes -----------------------------------------------------------------------

def _workers(search: Search, where, jobs: int, say) -> None:
    """`jobs` worker processes of the study on this machine (study.run_workers), with the
    data decoded here first, once."""
    from .study import run_workers
    from .trainer import load_data

    load_data(search.base)
    run_workers(_work, (search, where), jobs, say,
                "search stopped; run the same command again to continue (finished trials are "
                "kept, the stopped ones continue from their checkpoints)")


# ---- results ----------------------------------------------------------------------------------

def _outcome(run_dir: Path) -> dict:
    """A trial run's best and final validation accuracy, the test accuracy of its best.pt,
    its training seconds and the epochs it trained (and was to train): from summary.json,
    or from the records of a run the pruner stopped (or one that diverged or still
    trains)."""
    try:
        epochs = read_json(run_dir / "config.json")["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        epochs = None
    if (run_dir / "summary.json").is_file():
        s = read_json(run_dir / "summary.json")
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

    from .study import REFUSED, RUN

    again = _retried(trials)
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
    reached = [r for r in _reached(complete, target) if r["train_seconds"] is not None]
    return dict(min(reached, key=lambda r: r["train_seconds"])) if reached else None


def _target(info: dict) -> float | None:
    """A search's --target, from its plan (tune.json), or None."""
    return info["plan"]["tune"].get("target")


def _best_options(run_dir: Path) -> dict[str, Any]:
    """What a run trained with, as `cnnlab train --config` takes it: every option that can
    change the result (no model or dataset, no runtime option, no None: the default, none
    that means nothing for it, such as --muon-lr with sgd)."""
    config = read_json(run_dir / "config.json")
    return {k: config[k] for k in COMPARED
            if OPTIONS[k].kind != ARGUMENT and config.get(k) is not None
            and applies(config, k)}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_best(out: Path, search: Search, best: dict) -> None:
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
             f"{out / 'best.toml'}"]
    for key, value in best["options"].items():
        note = f"  # searched: {searched[key].describe()}" if key in searched else ""
        lines.append(f"{option_name(key)} = {_toml_value(value)}{note}")
    atomic_write(out / "best.toml", ("\n".join(lines) + "\n").encode())


def _importances(study, search: Search, complete: int) -> dict[str, float]:
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

    from .plots import _figure, _finish

    score = "best_val_acc" if target is None else "train_seconds"
    scored = [r for r in rows if r[score] is not None]
    if not scored:
        return None
    fig = _figure((7, 4.2))
    ax = fig.subplots()
    best_of = [r for r in scored if r["state"] == "complete"]
    kinds = [("complete", "o", "complete")]
    if target is not None:
        best_of = _reached(best_of, target)
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
    return _finish(fig, ax, path, xlabel="trial",
                   ylabel="best validation accuracy (%)" if target is None
                   else "training time (s)",
                   title=f"Optimisation history - {path.parent.name}")


def _reached(rows: list[dict], target: float) -> list[dict]:
    return [r for r in rows if r["final_val_acc"] is not None
            and r["final_val_acc"] >= target]


def _kind(row: dict, target: float | None) -> str:
    """How history.png draws a trial: its state, a complete one of a --target search as
    reached or below."""
    if row["state"] != "complete" or target is None:
        return row["state"]
    return "reached" if _reached([row], target) else "below"


def _plot_importance(importances: dict[str, float], complete: int, path: Path) -> Path:
    from .plots import _figure, _finish

    fig = _figure((7, 1.2 + 0.5 * len(importances)))
    ax = fig.subplots()
    names = list(importances)[::-1]  # the most important on top
    ax.barh(names, [importances[n] for n in names])
    return _finish(fig, ax, path, xlabel="importance (PED-ANOVA, summing to 1)",
                   title=f"Parameter importances ({complete} complete trials)")


def _scored(search: Search) -> str:
    """How results.md says the trials are scored."""
    if search.target is None:
        return ("Each trial is scored by its best validation accuracy - the epoch its best.pt "
                "was chosen on; the test accuracy of that best.pt chose nothing, so it is an "
                "honest estimate (choosing on test would make it optimistic).")
    return (f"Each trial is scored by its training time, to be as short as possible, if its "
            f"final validation accuracy reached {search.target:g}% (a trial below it does "
            "not count: Optuna's constrained TPE models it as infeasible); the test accuracy "
            "chose nothing, so it is an honest estimate.")


def _states(rows: list[dict]) -> str:
    """How the trials ended: "4 complete, 2 pruned"."""
    counts = {s: sum(r["state"] == s for r in rows) for s in
              ("complete", "pruned", "diverged", "failed", "running", "waiting")}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none run"


def summary_lines(info: dict) -> list[str]:
    """What a search found, in sentences (results.md, the report and the command's end)."""
    rows = info["rows"]
    lines = [f"{len(rows)} of {info['trials']} trials: {_states(rows)}."]
    if info["epochs_unpruned"]:
        saved = 1 - info["epochs_trained"] / info["epochs_unpruned"]
        lines.append(f"Epochs trained: {format_epochs(info['epochs_trained'])} in all, against "
                     f"{format_epochs(info['epochs_unpruned'])} had no trial been pruned "
                     f"({saved:.0%} saved).")
    best, target = info.get("best"), _target(info)
    if target is not None:
        complete = [r for r in rows if r["state"] == "complete"]
        reached = len(_reached(complete, target))
        lines.append(f"{reached} of {len(complete)} complete trials reached the target, "
                     f"{target:g}% on validation.")
    if best:
        params = ", ".join(f"{k}={_short_value(v)}" for k, v in best["params"].items())
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
            [[r["run"], r["state"], *(_short_value(r["params"][n]) if n in r["params"] else "-"
                                      for n in names),
              *scores(r), format_epochs(r["epochs_done"])] for r in info["rows"]])


def write_results(out: str | Path, search: Search, where) -> dict:
    """tune.json, results.md, best.toml, history.png and importance.png of the search's
    trials so far. Returns tune.json's content, with "out"."""
    from .study import Study

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
    if _plot_history(rows, out / "history.png", search.target):
        figures["history.png"] = ("Each trial's best validation accuracy and the best so far"
                                  if search.target is None else
                                  "Each trial's training time and the fastest to the target")
    if importances:
        _plot_importance(importances, len(complete), out / "importance.png")
        figures["importance.png"] = ("How much each searched option decides whether a "
                                     "trial is among the best")
    info["figures"] = figures
    write_json(out / TUNE_FILE, info)

    model, dataset = search.base.model, search.base.dataset
    seeded = "unseeded: --storage" if _shared(where) else f"seeded by --seed {search.base.seed}"
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
                  f"--config {out / 'best.toml'}`.", ""]
    for name, alt in info["figures"].items():
        lines += [f"![{alt}]({name})", ""]
    header, table = trials_table(info)
    lines += ["## Trials", "", md_table(
        header, [[f"[{c[0]}]({c[0]}/)", *c[1:]] for c in table]), ""]
    if best:
        lines += [f"## The best trial: {best['run']}", "",
                  f"![Loss of {best['run']}]({best['run']}/loss.png)", "",
                  f"![Accuracy of {best['run']}]({best['run']}/accuracy.png)", ""]
    refused = study.refused()
    lines += refused_section(refused)
    atomic_write(out / "results.md", "\n".join(lines).encode())
    return info | {"out": str(out), "refused": refused}
