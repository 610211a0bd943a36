"""Sweeps and searches as Optuna studies: one storage that any number of workers - processes
of one machine or of many - share, each taking points until none is left.

A sweep's points (grid points times seeds) are queued as Optuna's waiting trials when its
study is created; a worker takes one by moving it from waiting to running, which the storage
does for one worker only (a locked row: SQLite and PostgreSQL alike), so every point is
trained once however many workers start at the same moment. Only the worker whose
`create_study` made the study queues the points (creating a study of a name that exists
fails), so two workers creating it at once cannot queue them twice.

While a worker trains a point, a thread records a heartbeat in the storage every
HEARTBEAT seconds. A worker that dies (SIGKILL, power cut, a lost node) stops beating; once
its trial has been silent for GRACE seconds, the next worker to look fails it (Optuna's
`fail_stale_trials`) and queues it again (Optuna's RetryHeartbeatStaleTrialCallback), and
whoever takes it continues the run from its checkpoint, as `cnnlab train --resume` would.

Optuna and SQLAlchemy are imported here only: commands that do not use a study start fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CnnlabError, Interrupted, failure_message, one_line, shown
from .launch import cores_per_process
from .process import keep_freed_memory, stop_on_signals
from .stops import StopSignals

# Seconds between heartbeats, and of silence after which a running trial's worker counts as
# dead. Tests shorten them with CNNLAB_HEARTBEAT (the grace period is three heartbeats).
HEARTBEAT = int(os.environ.get("CNNLAB_HEARTBEAT", "10"))
GRACE = 3 * HEARTBEAT
READY = "cnnlab_ready"      # study user attribute: all points are queued
PLAN = "cnnlab_plan"        # study user attribute: digest of what the study trains
STOP = "cnnlab_stop"        # study user attribute: why workers must take no more points
RUN = "run"                 # trial user attribute: the run directory's name
REFUSED = "cnnlab_refused"  # trial system attribute: why its stored values were refused


# Seconds a worker keeps trying a storage operation that fails for want of the storage (a
# server restarting, a link down) before it gives up in one line; tests shorten it.
PATIENCE = float(os.environ.get("CNNLAB_STORAGE_PATIENCE", "120"))
# libpq's bounds on a connection (PostgreSQL): seconds to connect, and to find a silent
# server or a cut link dead (TCP keep-alives and the kernel's wait for unacknowledged data)
CONNECT_TIMEOUT = 10
POSTGRES_LINK = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 5,
                 "keepalives_interval": 2, "keepalives_count": 3, "tcp_user_timeout": 15000}
# What SQLite says when waiting cannot help: the file cannot be written or is not a database
_FOR_GOOD = ("readonly", "read-only", "disk is full", "malformed", "not a database",
             "unable to open", "no such table")


def patient(call: Callable[[], Any], what: str, reset: Callable[[], None] = lambda: None
            ) -> Any:
    """`call()`, tried again with growing pauses while the storage cannot be reached, for at
    most PATIENCE seconds, calling `reset` before each new try; then - or at once where
    waiting cannot help (a read-only or full SQLite file) - one line: CnnlabError."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, PendingRollbackError

    deadline, pause, said = time.monotonic() + PATIENCE, 0.5, False
    while True:
        try:
            return call()
        except (StorageInternalError, DBAPIError, PendingRollbackError) as e:
            with contextlib.suppress(Exception):
                reset()
            cause = e.__cause__ if isinstance(e, StorageInternalError) and e.__cause__ else e
            text = one_line(getattr(cause, "orig", None) or cause, 200)
            passing = isinstance(cause, (OperationalError, InterfaceError,
                                         PendingRollbackError)) or (
                isinstance(cause, DBAPIError) and cause.connection_invalidated)
            lasting = not passing or any(word in text.lower() for word in _FOR_GOOD)
            if lasting or time.monotonic() + pause > deadline:
                waited = "" if lasting else f" (tried for {PATIENCE:.0f} s)"
                raise CnnlabError(f"the study storage failed while {what}{waited}: "
                                  f"{text}") from None
            if not said:
                print(f"cnnlab: lost contact with the study storage while {what} ({text}); "
                      f"trying again for up to {PATIENCE:.0f} s", file=sys.stderr, flush=True)
                said = True
            time.sleep(pause)
            pause = min(2 * pause, 8.0)


def default_storage(folder: str | Path) -> str:
    """A SQLite file inside the sweep (or tune) directory: nothing to set up."""
    return f"sqlite:///{Path(folder).resolve() / 'study.db'}"


def digest(plan: Any) -> str:
    """A short digest of a JSON-able description of what a study trains."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _quiet_optuna() -> None:
    import optuna

    # no line per trial, nor Optuna's many-line warnings about the storage: ours say it
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def storage(url: str, attempts: int = 5):
    """The RDBStorage at `url` with heartbeats and retries of dead workers' trials; an
    unreachable or malformed URL is one line. Workers that open a new storage at the same
    moment race to create its tables (one of them fails: "already exists"); the losers
    try again, then find the tables made."""
    import warnings

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    _quiet_optuna()
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {
        "pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = dict(POSTGRES_LINK)
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
                warnings.simplefilter("ignore")
                opened = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT,
                                    grace_period=GRACE, heartbeat_stale_trial_callback=(
                                        RetryHeartbeatStaleTrialCallback()))
            if url.startswith("sqlite"):
                _write_locked(opened.engine)
            return opened
        except Exception as e:  # SQLAlchemy's and Optuna's errors come in many types
            cause = e.__cause__ or e
            racing = any(text in str(cause) for text in ("already exists", "UNIQUE constraint",
                                                         "duplicate key"))
            if racing and attempt < attempts - 1:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise CnnlabError(f"cannot open the study storage {_safe_url(url)}: "
                              f"{one_line(cause, 200)}") from None
    raise AssertionError("unreachable")


def _write_locked(engine) -> None:
    """Make every SQLite transaction take the database's write lock when it begins (BEGIN
    IMMEDIATE). Optuna takes a waiting trial by reading its row "for update" and then
    setting it running; PostgreSQL locks the row for that, SQLite ignores "for update" and
    Python's sqlite3 starts no transaction before the read, so two workers could both read
    "waiting" and both take the trial. Locked from the first statement, the second worker
    waits for the first to commit and then reads "running". (SQLAlchemy's recipe for
    pysqlite's transactions.)"""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(connection, record) -> None:
        connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners: none is reused


def _safe_url(url: str) -> str:
    """A storage URL with any password left out, for messages."""
    import re

    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


class Study:
    """The Optuna study of a sweep or a search, opened (created, with `points` queued, by
    the first worker) in the storage at `url` under `name`; `plan`: what it trains, which
    a worker of another sweep under the same name is refused by."""

    def __init__(self, url: str, name: str, plan: dict, *, points: list[dict] | None = None,
                 direction: str = "maximize", sampler=None, pruner=None) -> None:
        import optuna

        self.storage = storage(url)
        self.name, self.url = name, url
        wanted = digest(plan)

        def create() -> None:
            self.study = optuna.create_study(storage=self.storage, study_name=name,
                                             direction=direction, sampler=sampler,
                                             pruner=pruner)
            self.study.set_user_attr(PLAN, wanted)
            for point in points or []:  # the creator alone: no point is queued twice
                self.study.enqueue_trial({}, user_attrs=point)
            self.study.set_user_attr(READY, True)

        try:
            self.patient(create, "creating the study")
        except optuna.exceptions.DuplicatedStudyError:
            self.study = self.patient(lambda: optuna.load_study(
                storage=self.storage, study_name=name, sampler=sampler, pruner=pruner),
                "opening the study")
            self._wait_ready()
        found = self.patient(lambda: self.study.user_attrs, "reading the study").get(PLAN)
        if found != wanted:
            raise CnnlabError(f"the storage {_safe_url(url)} holds a study named '{name}' of "
                              "another sweep (other model, dataset, points or space); choose "
                              "another --out (or --study), or remove that study")
        self.id = self.storage.get_study_id_from_name(name)

    def patient(self, call: Callable[[], Any], what: str) -> Any:
        """patient(), with this thread's storage session thrown away after a failure (one
        that failed mid-transaction refuses every later use)."""
        return patient(call, what, reset=self.storage.scoped_session.remove)

    def _wait_ready(self, seconds: float = 60.0) -> None:
        """Another worker created the study a moment ago: wait until it queued the points."""
        deadline = time.monotonic() + seconds
        while READY not in self.storage.get_study_user_attrs(
                self.storage.get_study_id_from_name(self.name)):
            if time.monotonic() > deadline:
                raise CnnlabError(f"study '{self.name}' in {_safe_url(self.url)} was created but "
                                  "its points were never all queued (its first worker "
                                  "stopped at once?); remove the study and start again")
            time.sleep(0.2)

    # ---- taking points ------------------------------------------------------------------

    def fail_stale(self) -> None:
        """Fail the trials of workers that stopped beating and queue them again."""
        import warnings

        from optuna.storages import fail_stale_trials

        with warnings.catch_warnings():  # "experimental"
            warnings.simplefilter("ignore")
            self.patient(lambda: fail_stale_trials(self.study), "looking for silent workers")

    def take(self):
        """A waiting trial, now running for this worker alone (an optuna.Trial), or None when
        none waits."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        self.fail_stale()
        for trial in self.patient(lambda: self.storage.get_all_trials(
                self.id, deepcopy=False, states=(TrialState.WAITING,)), "reading the trials"):
            try:
                if self.patient(lambda t=trial: self.storage.set_trial_state_values(
                        t._trial_id, TrialState.RUNNING), "taking a trial"):
                    # optuna.Trial reads the storage too (the sampler's view of the study)
                    return self.patient(lambda t=trial: optuna.Trial(self.study, t._trial_id),
                                        "reading a trial")
            except UpdateFinishedTrialError:  # another worker took it meanwhile
                continue
        return None

    def running(self) -> int:
        from optuna.trial import TrialState

        return len(self.patient(lambda: self.storage.get_all_trials(
            self.id, deepcopy=False, states=(TrialState.RUNNING,)), "reading the trials"))

    def reopen(self, unfinished: list[str]) -> None:
        """A command starting over: the runs named, which no trial waits for or runs, are
        queued again (their trial completed or failed, but their directory says the run is
        not done: removed or cut since, or a run that failed before), and a stop that an
        earlier worker asked for is lifted. Two workers doing this at once may queue a run
        twice; the run's lock and its summary.json make the second taker skip it."""
        from optuna.trial import TrialState

        def reopen() -> None:
            active = {name for t in self.storage.get_all_trials(
                self.id, deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
                if isinstance(name := t.user_attrs.get(RUN), str)}  # stored: anything
            for name in unfinished:
                if name not in active:
                    self.study.enqueue_trial({}, user_attrs={RUN: name})
            if self.storage.get_study_user_attrs(self.id).get(STOP) is not None:
                self.storage.set_study_user_attr(self.id, STOP, None)

        self.patient(reopen, "queueing the unfinished points")

    def stop_reason(self) -> str | None:
        return self.patient(lambda: self.storage.get_study_user_attrs(self.id),
                            "reading the study").get(STOP)

    def stop_all(self, reason: str) -> None:
        """Tell every worker (on every machine) to take no more points."""
        self.patient(lambda: self.storage.set_study_user_attr(self.id, STOP, reason),
                     "stopping the study")

    @contextlib.contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Record that this worker is alive every HEARTBEAT seconds while the block runs."""
        done = threading.Event()

        def beat() -> None:
            lost = False
            while True:
                try:
                    self.storage.record_heartbeat(trial_id)
                    lost = False
                except Exception as e:  # a fresh session for the next beat; said once
                    with contextlib.suppress(Exception):
                        self.storage.scoped_session.remove()
                    if not lost:
                        print("cnnlab: lost contact with the study storage while recording "
                              f"this worker's heartbeat ({one_line(e.__cause__ or e, 160)}); "
                              "training goes on", file=sys.stderr, flush=True)
                    lost = True
                if done.wait(HEARTBEAT):
                    return

        thread = threading.Thread(target=beat, daemon=True, name="cnnlab-heartbeat")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def finish(self, trial, value: float | None, state: str = "complete") -> bool:
        """End `trial`: complete with `value`, pruned, failed (not to be retried: a bad run, a
        divergence), or "again": stopped by a signal, queued again for any worker. False where
        another worker had failed it meanwhile (this one's heartbeat had stopped reaching the
        storage) and queued it again: that worker's trial stands for it."""
        import warnings

        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        def end() -> bool:
            now = self.storage.get_trial(trial._trial_id)
            if now.state.is_finished():
                return False
            if state == "complete":
                self.storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE,
                                                    [value])
                return True
            if state == "pruned":  # its value: the last it reported, as Optuna's own loop
                last = now.intermediate_values[max(now.intermediate_values)] if \
                    now.intermediate_values else None
                self.storage.set_trial_state_values(trial._trial_id, TrialState.PRUNED,
                                                    None if last is None else [last])
                return True
            self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            if state == "again":
                with warnings.catch_warnings():  # "experimental"
                    warnings.simplefilter("ignore")
                    RetryHeartbeatStaleTrialCallback()(self.study, self.storage.get_trial(
                        trial._trial_id))
            return True

        return self.patient(end, "recording a trial's end")

    def stored(self, trial):
        """All the storage holds of `trial` (an optuna.FrozenTrial)."""
        return self.patient(lambda: self.storage.get_trial(trial._trial_id),
                            "reading a trial")

    def refuse(self, trial, reason: str) -> None:
        """Fail `trial`, whose stored values failed the check, with `reason`: never queued
        again (only a running trial whose worker fell silent is)."""
        from optuna.trial import TrialState

        def end() -> None:
            self.storage.set_trial_system_attr(trial._trial_id, REFUSED, reason)
            self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)

        self.patient(end, "refusing a trial")

    def refused(self) -> list[str]:
        """Why each refused trial of the study was refused."""
        from optuna.trial import TrialState

        return [shown(t.system_attrs[REFUSED], 300) for t in self.patient(
            lambda: self.storage.get_all_trials(self.id, deepcopy=False,
                                                states=(TrialState.FAIL,)),
            "reading the trials") if REFUSED in t.system_attrs]


# ---- worker processes on this machine --------------------------------------------------------

def run_workers(work: Callable[..., None], args: tuple, jobs: int, say: Callable[[str], None],
                stopped: str) -> None:
    """`jobs` worker processes of a study on this machine (`--jobs`), each calling
    `work(*args, progress=False, say=say, slot=(slot, gpus))` with 1/jobs of the CPU cores
    as torch threads (`work` and `say` must be module-level functions: a spawned process
    imports them). The caller decodes the data first, once.

    A signal (Ctrl-C, SIGTERM) reaches this process alone, which passes each one on to the
    workers: on the first each checkpoints its run, puts its point back in the queue and
    stops (on a second, at once); then Interrupted(`stopped`). Killed itself, this process
    takes the workers with it: each asked the kernel for a SIGTERM when its parent dies.
    A worker that fails ends the call with its error once the others end."""
    import multiprocessing
    from multiprocessing.connection import wait

    import torch


    gpus = torch.cuda.device_count()
    context = multiprocessing.get_context("spawn")
    running: dict[Any, tuple[Any, Any]] = {}  # sentinel -> (process, pipe end)
    failed: list[str] = []

    def say_stopping(signum: int) -> None:  # said also with --quiet: it answers the user
        print(f"cnnlab: {signal.Signals(signum).name}: stopping the {len(running)} workers "
              "after their current step (press Ctrl-C again to stop them at once)",
              file=sys.stderr, flush=True)

    def pass_on(signum: int) -> None:
        for process, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)

    with StopSignals(say_stopping, pass_on=pass_on) as signals:
        for slot in range(jobs):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(
                work, args, say, cores_per_process(jobs), (slot, gpus), send))
            process.start()
            send.close()
            running[process.sentinel] = (process, receive)
        while running:
            for sentinel in wait(list(running)):
                process, receive = running.pop(sentinel)
                try:
                    outcome = receive.recv() if receive.poll() else None
                except (EOFError, OSError):  # killed before it could say why
                    outcome = None
                receive.close()
                process.join()
                if signals.signum is not None:
                    continue
                if outcome is not None:
                    failed.append(outcome)
                elif process.exitcode and process.exitcode < 0:
                    failed.append(f"a worker was killed ({signal.Signals(-process.exitcode).name})")
                elif process.exitcode:
                    failed.append(f"a worker ended with status {process.exitcode}")
    if signals.signum is not None:
        raise Interrupted(stopped, signals.signum)
    if failed:
        raise CnnlabError(failed[0])


def _die_with_parent() -> None:
    """Ask Linux for a SIGTERM when the parent process dies (prctl PR_SET_PDEATHSIG), so that
    no worker outlives its sweep; where there is no prctl, nothing."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker(work: Callable[..., None], args: tuple, say: Callable[[str], None], threads: int,
            slot: tuple[int, int], send) -> None:
    """One worker process (see run_workers): signals come from the parent only; sends None
    when done, else why it stopped (the error)."""
    import traceback


    os.environ["OMP_NUM_THREADS"] = str(threads)  # this worker's share, before torch loads
    parent = os.getppid()
    os.setpgrp()  # out of the terminal's process group: a Ctrl-C reaches the parent alone
    stop_on_signals()  # a process of cnnlab's own, as the command's
    keep_freed_memory()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the request was in place
        return
    outcome = None
    try:
        import torch
        from tqdm import tqdm

        # tqdm's default lock is a multiprocessing semaphore, which the parent's resource
        # tracker would find leaked (a traceback) if this worker is killed; bars here are
        # off anyway, and threads are all a worker has
        tqdm.set_lock(threading.RLock())
        torch.set_num_threads(threads)
        work(*args, progress=False, say=say, slot=slot)
    except (Interrupted, KeyboardInterrupt):  # its point is back in the queue (Study.work)
        pass
    except BaseException as e:
        message = failure_message(e)
        if message is None:  # a bug: its traceback, for the report
            traceback.print_exc()
            message = f"{type(e).__name__}: {one_line(e)}"
        outcome = message
    with contextlib.suppress(OSError):  # the parent is gone (killed): nobody to tell
        send.send(outcome)
        send.close()
    # ending: a signal now (a second from the parent, or one re-sent after an import) has
    # nothing left to stop, and raised inside the interpreter's exit it is a traceback
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
