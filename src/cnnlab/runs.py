"""The run directory: the one contract between training and everything that reads results.

    config.json     the resolved configuration
    env.json        the machine and versions
    metrics.jsonl   one JSON record per line: `train` (every log_every steps), `eval` (per epoch)
    checkpoint.pt   latest state; best.pt: the state with the best test accuracy
    summary.json    the outcome
    loss.png, accuracy.png, utilization.png
    tensorboard/    TensorBoard event files (with --tensorboard)

Every file is written atomically (temp file + rename): a killed run never leaves half a file.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import checkpoint
from .errors import CnnlabError
from .files import safe_name, write_json

# What a training run writes (RUN_FILES names them all): evaluation and export never write
# over these.
RUN_FILES = frozenset({"config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "best.pt",
                       "summary.json", "loss.png", "accuracy.png", "utilization.png",
                       "tensorboard"})

def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl (a torn last line from a crash is skipped)."""
    records = []
    path = Path(run_dir) / "metrics.jsonl"
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
    name = safe_name(dataset.removeprefix("folder:"), "folder")
    return unique_dir(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{name}")


class RunDir:
    """Writer for one run directory (a new one, or an existing one to resume)."""

    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.check(self.path, resume=resume)
        self._lock = threading.Lock()
        self._sinks: list[Callable[[dict], None]] = []
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._metrics = (self.path / "metrics.jsonl").open("a", buffering=1)
        except OSError as e:
            raise CnnlabError(f"cannot create run directory {self.path}: "
                              f"{e.strerror or e}") from None

    @staticmethod
    def check(path: Path, *, resume: bool = False) -> None:
        """Refuse to start a new run where one already is (before anything is written)."""
        if not resume and (path / "config.json").exists():
            raise CnnlabError(f"{path} already holds a run; choose another --out, "
                              f"remove it, or continue it with --resume {path}")

    def add_sink(self, sink: Callable[[dict], None]) -> None:
        """Also send every record to `sink` (e.g. TensorBoard)."""
        self._sinks.append(sink)

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def log(self, record: dict) -> None:
        with self._lock:  # the telemetry thread logs too
            self._metrics.write(json.dumps(record) + "\n")
            for sink in self._sinks:
                sink(record)

    def metrics_offset(self) -> int:
        """Bytes of metrics.jsonl written so far (stored in checkpoints, to cut back to)."""
        with self._lock:
            self._metrics.flush()
            return self._metrics.tell()

    def truncate_metrics(self, offset: int) -> None:
        """Drop the records written after a checkpoint, before resuming from it."""
        with self._lock:
            self._metrics.flush()
            self._metrics.truncate(offset)
            self._metrics.seek(offset)

    def save_checkpoint(self, name: str, state: dict) -> None:
        try:
            checkpoint.save(self.path / name, state)
        except OSError as e:
            raise CnnlabError(f"cannot write {self.path / name}: {e.strerror or e}; the "
                              "previous checkpoint is intact - free some space and resume "
                              f"with --resume {self.path}") from None

    def close(self) -> None:
        with self._lock:  # the telemetry thread may be logging
            for sink in self._sinks:
                if hasattr(sink, "close"):
                    sink.close()
            self._sinks.clear()
            self._metrics.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
