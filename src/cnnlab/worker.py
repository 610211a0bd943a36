"""The worker of a study, one for sweeps and searches alike: take a trial, check everything
the storage says about it, train (or continue, or recognise as done) its run, finish it.

A study's storage is shared: anyone with its URL can write a trial's run name, its params,
its attributes, the study's attributes. So every value a worker takes from it is input from
other people and is checked as a command-line argument is, in one place (`Job.check`), before
it is used: a run name is one path component that the command itself would have made (a
sweep's plan point, a search's `trial-NNNN`) and lies inside the sweep or tune directory;
params are the plan's point (sweep) or inside the searched space (search). A trial that fails
the check is failed with the reason (Study.refuse), said once, escaped, and never queued
again; the workers go on with the other points, and the command's end says how many were
refused.

A run directory is changed only by the process holding its lock (runs.RunDir), and a run
counts as a point's only if its configuration is the point's: a directory that holds a run
with other settings is refused, never removed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import short, with_defaults
from .errors import CnnlabError, Interrupted, TrainingDiverged, failure_message, shown
from .options import COMPARED, Config, format_value, option_name
from .results import diverged_error
from .resume import resume_config
from .runs import CONFIG, SUMMARY, DamagedFile, RunLocked, read_object, wait_unlocked
from .study import default_storage, digest

NAME_MAX = 200  # characters of a run name read from a study
MAX_JOBS = 256  # worker processes of one command (--jobs)


@dataclass(frozen=True)
class Where:
    """A sweep's or search's study (storage URL and study name) and its directory."""

    url: str
    name: str
    out: Path

    @classmethod
    def of(cls, out: Path, plan: dict, storage: str | None, study: str | None) -> Where:
        """The study of the sweep or search in `out` that trains `plan`: in `storage`
        (default: a SQLite file in `out`) under `study` (default: the name of `out` and a
        digest of the plan, so that another plan is another study)."""
        return cls(storage or default_storage(out),
                   study or f"{out.resolve().name}-{digest(plan)[:8]}", out)

    @property
    def shared(self) -> bool:
        """Whether the study lives in a storage given with --storage: one other machines
        may share."""
        return self.url != default_storage(self.out)


def check_jobs(jobs: Any) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise CnnlabError(f"--jobs must be a positive integer, at most {MAX_JOBS}, got "
                          f"{short(jobs)}")


class Refused(CnnlabError):
    """A trial whose stored values fail the check: it is failed, never trained."""


def check_run_name(name: Any, out: Path, allowed: Callable[[str], bool]) -> str:
    """`name`, a run name read from a study, if it is one this command makes (`allowed`), one
    printable path component, and a directory inside `out`; else Refused."""
    if not isinstance(name, str):
        raise Refused(f"its run name is not text ({shown(name)})")
    if (not name or len(name) > NAME_MAX or not name.isprintable() or name in (".", "..")
            or "/" in name or "\\" in name or not allowed(name)):
        raise Refused(f"its run name '{shown(name)}' is none this command makes")
    inside = out.resolve()
    if (out / name).resolve().parent != inside:  # a symbolic link out of the folder
        raise Refused(f"its run name '{shown(name)}' leads out of {out}")
    return name


def refused_section(reasons: list[str]) -> list[str]:
    """results.md's lines on the trials of the study that were refused (none: no lines)."""
    if not reasons:
        return []
    return ["## Refused trials", "", f"{len(reasons)} trial{'s' if len(reasons) > 1 else ''} "
            "in the study's storage held values that failed the check (someone with the "
            "storage's URL wrote them); none was trained:", "",
            *(f"- {reason}" for reason in reasons), ""]


def stored_params(trial) -> dict[str, Any]:
    """The params a trial holds or is to take (enqueued with it: Optuna's `fixed_params`)."""
    fixed = trial.system_attrs.get("fixed_params", {})
    if not isinstance(fixed, dict):
        raise Refused(f"its enqueued params are not a table ({shown(fixed)})")
    return {**fixed, **trial.params}


def config_difference(run_dir: Path, cfg: Config) -> str | None:
    """What differs between the configuration of the run in `run_dir` and `cfg` (the options
    that change the result), or None where they agree."""
    try:
        done = with_defaults(read_object(run_dir / CONFIG, missing_ok=False))
    except (DamagedFile, TypeError):
        return f"its {CONFIG} is missing or damaged"
    for key, value in cfg.to_dict().items():
        if key in COMPARED and done.get(key) != value:
            return (f"it ran with {option_name(key)}={format_value(done.get(key))}, this "
                    f"point asks for {format_value(value)}")
    return None


def train_or_continue(run_dir: Path, cfg: Config, tag: str, job: str, *, progress: bool,
                      say: Callable[[str], None],
                      on_eval: Callable[[dict], None] | None = None) -> dict:
    """The summary of a study's run in `run_dir`, trained as `cfg` says: read where it is
    finished, continued from its checkpoint where it is not, trained where it has not begun.
    Waits while another live process writes it; a run there with other settings is Refused,
    one that diverged raises TrainingDiverged."""
    from .trainer import fit  # torch: not for the commands that only read studies

    while True:
        wait_unlocked(run_dir, lambda: say(f"{tag}: another process is still writing it; "
                                           "waiting for it to end"))
        if (error := diverged_error(run_dir)) is not None:
            raise TrainingDiverged(error)
        begun = (run_dir / CONFIG).is_file()
        if begun and (why := config_difference(run_dir, cfg)) is not None:
            raise Refused(f"{run_dir} holds a run with other settings ({why}); remove it or "
                          "choose another --out")
        if (summary := read_object(run_dir / SUMMARY)) is not None:
            say(f"{tag}: finished before, skipped")
            return summary
        try:
            if not begun:
                say(f"{tag}: training{job}")
                return fit(cfg, run_dir, progress=progress, on_eval=on_eval, alone=False)
            say(f"{tag}: continuing from its checkpoint{job}")
            resumed, how = resume_config(run_dir, {"device": cfg.device})
            return fit(resumed, run_dir, progress=progress, on_eval=on_eval, resume=how,
                       alone=False)
        except RunLocked:  # another worker took the run a moment before us: look again
            continue


def job_device(device: str, slot: int, gpus: int) -> str:
    """The device of a run in job slot `slot` (0, 1, ...): with several GPUs and the device
    left to cnnlab (auto or cuda), one GPU per slot, round-robin; else the run's own."""
    return f"cuda:{slot % gpus}" if gpus > 1 and device in ("auto", "cuda") else device


def on_slot(cfg: Config, slot: tuple[int, int] | None) -> tuple[Config, str]:
    """`cfg` on the device of a worker process's (job slot, GPUs), and how a line names the
    job ("" outside `--jobs`)."""
    if slot is None:
        return cfg, ""
    device = job_device(cfg.device, *slot)
    tag = f" (job {slot[0] + 1}{', ' + device if device.startswith('cuda:') else ''})"
    return dataclasses.replace(cfg, device=device), tag


def attempt(call: Callable[[], dict], name: str, *, command: str, study,
            say: Callable[[str], None], tag: str = "") -> tuple[str, dict | None]:
    """("complete", the summary `call` returns), or ("failed", None) where the run of `name`
    (`tag` in lines: "[2/4] name") diverged (the study goes on) or cannot train (a bad
    configuration is bad everywhere: every worker is stopped). A signal is said as "COMMAND
    stopped during NAME"; Refused, and a bug, go up."""
    things = "runs" if command == "sweep" else "trials"
    try:
        return "complete", call()
    except TrainingDiverged as e:  # the run wrote diverged.json
        say(f"{tag or name}: diverged ({e}); going on with the other {things}")
        return "failed", None
    except Interrupted as e:
        raise Interrupted(f"{'search' if command == 'tune' else command} stopped during "
                          f"{name}; run the same command again to continue (finished {things} "
                          "are kept, that one continues from its checkpoint)", e.signum) from None
    except Refused:
        raise
    except (CnnlabError, OSError, MemoryError, RuntimeError) as e:
        message = failure_message(e)
        if message is None:
            raise
        study.stop_all(f"{name}: {message}")
        return "failed", None


class Job:
    """What one command's workers do with the trials of its study (sweep.SweepJob,
    tune.SearchJob)."""

    def new_trial(self, study) -> Any:
        """A new trial to run when none waits, or None (a sweep's points are all queued)."""
        return None

    def check(self, trial) -> Any:
        """What the trial (an optuna.FrozenTrial: all it holds) is to run, from its stored
        values checked; Refused otherwise."""
        raise NotImplementedError

    def run(self, trial, point: Any) -> tuple[str, float | None]:
        """Run the checked trial: ("complete", value), ("pruned", None) or ("failed", None)."""
        raise NotImplementedError


def work(study, job: Job, say: Callable[[str], None], poll: float = 1.0) -> None:
    """Take trials - waiting ones first, then `job`'s new ones - check and run each until none
    is left and no other worker runs one (whose worker might still die and leave it to us),
    or until a worker stops the study (CnnlabError with its reason)."""
    waiting_said = False
    while (reason := study.stop_reason()) is None:
        trial = study.take() or job.new_trial(study)
        if trial is None:
            if not study.running():
                return
            if not waiting_said:
                say("no point left to take; waiting for the running ones (a point whose "
                    "worker dies is taken over)")
                waiting_said = True
            time.sleep(poll)
            continue
        waiting_said = False
        try:
            point = job.check(study.stored(trial))
            with study.heartbeat(trial._trial_id):
                try:
                    state, value = job.run(trial, point)
                except Refused:  # what it found on disk: a run of other settings
                    raise
                except BaseException:
                    study.finish(trial, None, "again")
                    raise
        except Refused as e:
            study.refuse(trial, str(e))
            say(f"refused trial {trial.number} of the study: {e}")
            continue
        if not study.finish(trial, value, state):
            say(f"trial {trial.number} was taken over by another worker while this one had "
                "no contact with the storage; its run directory's lock kept one writer")
    raise CnnlabError(shown(reason, 500))

