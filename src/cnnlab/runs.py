"""The run directory: the one contract between training and everything that reads results.

    config.json     the resolved configuration, and under "resolved" what ran (config.run_config)
    env.json        the machine and versions
    metrics.jsonl   one JSON record per line: `train` (every log_every steps), `eval` (per epoch)
    checkpoint.pt   latest state; best.pt: the state chosen on validation (else on test)
    model_source.py the user's own model: the source it was built from (its hash in the
                    checkpoints' model_meta)
    data.json       data handed over from Python: its shapes, classes and digest
    summary.json    the outcome (diverged.json instead where the loss became NaN)
    loss.png, accuracy.png, utilization.png
    tensorboard/    TensorBoard event files (with --tensorboard)
    .cnnlab.lock    locked by the process that writes the run

A sweep's or a search's directory holds its run directories beside sweep.json or tune.json,
results.md, results.csv and its figures. This module names every one of these files (no
other module spells them) and reads the JSON ones with one policy (`read_object`).

Every file is written atomically (temp file + rename) and metrics.jsonl a whole line at a
time: a killed run, or one that ran out of disk space, never leaves half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import CnnlabError
from .files import remove_temp_files, safe_name, write_json

# The files of a run directory, named here alone (a test checks that no other module spells
# them): everything else reads and writes them through these names.
CONFIG = "config.json"        # the options as asked, and under "resolved" what ran
ENV = "env.json"              # the machine and versions
METRICS = "metrics.jsonl"     # the records, a line each
CHECKPOINT = "checkpoint.pt"  # the latest training state
BEST = "best.pt"              # the state best.pt was chosen for
SUMMARY = "summary.json"      # the outcome: written last, so it marks a finished run
DIVERGED = "diverged.json"    # written instead where the loss became NaN
MODEL_SOURCE = "model_source.py"  # the user's own model: a copy of its source file
DATA_INFO = "data.json"       # data handed over from Python: its shapes, classes and digest
LOSS_PLOT, ACCURACY_PLOT, UTILIZATION_PLOT = "loss.png", "accuracy.png", "utilization.png"
CONFUSION_PLOT = "confusion.png"  # drawn by the report
TENSORBOARD = "tensorboard"   # the event files' folder (--tensorboard)
LOCK_FILE = ".cnnlab.lock"    # held by the process writing the run (see RunDir)
# What a training run writes: evaluation and export never write over these.
RUN_FILES = frozenset({CONFIG, ENV, METRICS, CHECKPOINT, BEST, SUMMARY, LOSS_PLOT, ACCURACY_PLOT,
                       UTILIZATION_PLOT, LOCK_FILE, TENSORBOARD, DIVERGED, MODEL_SOURCE,
                       DATA_INFO})

# The files of a sweep's or a search's directory, beside its run directories
SWEEP_FILE = "sweep.json"     # marks a sweep directory: its plan, whoever extended it
TUNE_FILE = "tune.json"       # marks a search's: the plan, then every trial's outcome
SWEEP_LOCK = ".cnnlab-sweep.lock"  # held while the plan or the results are written
RESULTS_MD, RESULTS_CSV = "results.md", "results.csv"
BEST_OPTIONS = "best.toml"    # a search's best trial's options, for `cnnlab train --config`
COMPARISON_PLOT, HISTORY_PLOT, IMPORTANCE_PLOT = "comparison.png", "history.png", "importance.png"


class DamagedFile(CnnlabError):
    """A file of a run, sweep or search directory that is there but cannot be read as what it
    should be; `what` says how ("is missing", "is unreadable", "is no object")."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{path} {what}")
        self.path, self.what = path, what


def read_object(path: str | Path, *, missing_ok: bool = True) -> dict | None:
    """The JSON object a file of a run, sweep or search directory holds (config.json,
    summary.json, sweep.json ...) - the one policy for reading them: None where the file is
    missing (DamagedFile too where not `missing_ok`), DamagedFile where it is there but
    cannot be read, is no JSON or holds no object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DamagedFile(path, "is missing") from None
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        raise DamagedFile(path, "is unreadable") from None
    if not isinstance(value, dict):
        raise DamagedFile(path, "is no object")
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl (a torn last line from a crash is skipped)."""
    records = []
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def unique_dir(root: str | Path, stem: str) -> Path:
    """root/stem, or root/stem-2, root/stem-3, ...: the first that does not exist yet."""
    path, n = Path(root) / stem, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stem}-{n}"
    return path


def default_run_dir(model: str, dataset: str, root: str | Path = "runs") -> Path:
    """runs/<time>-<model>-<dataset>: the name a new run's directory starts from (new_dir
    makes it the first free one)."""
    name = safe_name(dataset.removeprefix("folder:"), "folder")
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{model_part(model)}-{name}"


def model_part(model: str) -> str:
    """A model's name as part of a folder's: net-Net for path/to/net.py:Net,
    torchvision-resnet50 for torchvision:resnet50."""
    where, colon, attr = model.rpartition(":")
    if not colon:
        return model
    return safe_name(f"{Path(where).stem if where.endswith('.py') else where}-{attr}", "model")


def new_dir(path: Path) -> Path:
    """Create and return `path`, or path-2, path-3, ...: the first this process creates
    itself. mkdir either creates a directory or fails, so two processes asking at once
    never get the same one (checking first and creating after would race)."""
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")
        except OSError as e:
            raise CnnlabError(f"cannot create run directory {candidate}: "
                              f"{e.strerror or e}") from None


class RunDir:
    """Writer for one run directory: a new one (`config` given: written first, as the claim)
    or an existing one to continue (`config` None).

    The directory is locked while a process writes to it, so that two processes never mix
    their files; the lock goes with the process, however it ends."""

    def __init__(self, path: str | Path, *, config: dict | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._sinks: list[Callable[[dict], None]] = []
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._claim = _lock(self.path / LOCK_FILE)
        except OSError as e:
            raise CnnlabError(f"cannot create run directory {self.path}: "
                              f"{e.strerror or e}") from None
        try:
            self.check(self.path, resume=config is None, held=True)
            remove_temp_files(self.path)  # from a process killed while writing
            if config is not None:
                write_json(self.path / CONFIG, config)
            self._metrics = (self.path / METRICS).open("ab", buffering=0)
        except BaseException:
            self._claim.close()
            raise

    @staticmethod
    def check(path: Path, *, resume: bool = False, held: bool = False) -> None:
        """Refuse to start a new run where one already is (one a live process writes, unless
        `held`: this process holds its lock), or in a folder that holds other things (before
        anything is written)."""
        if resume:
            return
        if not held and is_locked(path):
            raise RunLocked(f"another cnnlab process is writing to {path} and still runs; wait "
                            "for it to end or choose another --out")
        if (path / CONFIG).exists():
            raise CnnlabError(f"{path} already holds a run; choose another --out, "
                              f"remove it, or continue it with --resume {path}")
        if path.is_dir():
            others = sorted(p.name for p in path.iterdir()
                            if p.name != LOCK_FILE and not p.name.endswith(".tmp"))
            if others:
                raise CnnlabError(f"{path} is not empty ({', '.join(others[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}) and holds no run; "
                                  "choose another --out or empty it")

    def add_sink(self, sink: Callable[[dict], None]) -> None:
        """Also send every record to `sink` (e.g. TensorBoard)."""
        self._sinks.append(sink)

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl: the whole line or, when the disk is full,
        nothing (an OSError naming the file)."""
        line = memoryview((json.dumps(record) + "\n").encode())
        with self._lock:  # the telemetry thread logs too
            start = self._metrics.tell()
            try:
                while line:  # an unbuffered write may take part of the line at a time
                    line = line[self._metrics.write(line):]
            except OSError as e:
                self._metrics.truncate(start)
                self._metrics.seek(start)
                raise OSError(e.errno, e.strerror, str(self.path / METRICS)) from None
            for sink in self._sinks:
                sink(record)

    def metrics_offset(self) -> int:
        """Bytes of metrics.jsonl written so far (stored in checkpoints, to cut back to)."""
        with self._lock:
            return self._metrics.tell()

    def truncate_metrics(self, offset: int) -> None:
        """Drop the records written after a checkpoint, before resuming from it (never
        padding the file: see check_metrics)."""
        with self._lock:
            self.check_metrics(self.path, offset)
            self._metrics.truncate(offset)
            self._metrics.seek(offset)

    @staticmethod
    def check_metrics(path: Path, offset: int) -> None:
        """Refuse to resume run `path` from a checkpoint written when metrics.jsonl held
        `offset` bytes if it holds fewer now: the records it lost are gone, and cutting it
        back to the checkpoint would pad it with NUL bytes, which no JSON Lines reader takes."""
        file = path / METRICS
        size = file.stat().st_size if file.is_file() else None
        if (size or 0) < offset:
            what = (f"is missing (it held {offset:,} bytes when checkpoint.pt was written)"
                    if size is None else f"holds {size:,} bytes, fewer than the {offset:,} "
                    "it had when checkpoint.pt was written: it was cut")
            raise CnnlabError(f"{file} {what}; restore it, or remove checkpoint.pt to train "
                              "the run again from the start")

    def close(self) -> None:
        with self._lock:  # the telemetry thread may be logging
            for sink in self._sinks:
                if hasattr(sink, "close"):
                    sink.close()
            self._sinks.clear()
            self._metrics.close()
            self._claim.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def wait_unlocked(run_dir: Path, waiting: Callable[[], None], poll: float = 1.0) -> None:
    """Return once no process holds `run_dir`'s lock (at once if it has none), calling
    `waiting` once if one does: a sweep never writes or removes a run that another live
    process writes."""
    said = False
    while is_locked(run_dir):
        if not said:
            waiting()
            said = True
        time.sleep(poll)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds `run_dir`'s lock (False where it has none): the lock goes
    with its process, so a run killed outright leaves an unheld one."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return False
    try:
        _lock(path).close()
        return False
    except RunLocked:
        return True


@contextlib.contextmanager
def hold(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing) while the block runs, waiting for
    another process that holds it."""
    with path.open("ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def _lock(path: Path) -> IO[bytes]:
    """Hold an exclusive lock on `path` until the returned file is closed (or the process
    ends); refuse if another process holds it."""
    f = path.open("ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RunLocked(f"another cnnlab process is writing to {path.parent}; wait for it "
                        "to end or choose another --out") from None
    return f


class RunLocked(CnnlabError):
    """Another live process holds the run directory's lock."""
