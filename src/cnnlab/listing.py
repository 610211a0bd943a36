"""`cnnlab runs`: the run, sweep and search directories under a folder, oldest first, as a
table or as JSON.

It reads only the small JSON files of each run and the end of metrics.jsonl (an unfinished
run's last step and evaluations) - never a checkpoint, and never torch - so that it stays
fast over hundreds of runs. A run's status is one of: finished (summary.json), diverged
(diverged.json), running (a live process holds its lock), interrupted or pruned (by a
search) at its last recorded step, not started (no step recorded), damaged (config.json or
summary.json unreadable).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CnnlabError
from .report import RunInfo, outcome
from .results import diverged_error, format_epochs, metric, pct_text
from .runs import (
    CHECKPOINT,
    CONFIG,
    DIVERGED,
    ENV,
    METRICS,
    SUMMARY,
    SWEEP_FILE,
    TUNE_FILE,
    DamagedFile,
    is_locked,
    read_object,
)

# Any of these makes a folder a run directory (a damaged one without config.json)
_RUN_MARKS = (CONFIG, SUMMARY, METRICS, CHECKPOINT, DIVERGED)
TAIL_BYTES = 256 * 1024  # of metrics.jsonl read for an unfinished run
_HEAD_BYTES = 4096       # of metrics.jsonl read for its first record's time
_MAX_DEPTH = 3           # plain folders looked into below the one listed


@dataclass
class Entry:
    """One row: a run, or a sweep or search (kind "sweep" / "tune") with its runs."""

    path: Path
    name: str                    # the path relative to the folder listed
    kind: str                    # run, sweep, tune
    status: str                  # a run's (see above); a sweep's: finished/running/incomplete
    started: float               # seconds since the epoch
    model: str | None = None
    dataset: str | None = None
    step: int | None = None      # the last optimiser step recorded (diverged: where)
    best_test_acc: float | None = None
    final_test_acc: float | None = None
    epochs_done: float | None = None
    epochs: float | None = None
    train_seconds: float | None = None
    error: str | None = None     # what is damaged, or how the run diverged
    runs: list[Entry] = field(default_factory=list)
    finished: int | None = None  # a sweep's runs finished, of `total`
    total: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as JSON: numbers as numbers; a sweep's runs under "runs"."""
        out = {"name": self.name, "path": str(self.path), "kind": self.kind,
               "model": self.model, "dataset": self.dataset, "status": self.status,
               "step": self.step, "best_test_acc": self.best_test_acc,
               "final_test_acc": self.final_test_acc, "epochs_done": self.epochs_done,
               "epochs": self.epochs, "train_seconds": self.train_seconds,
               "started": _local_time(self.started), "started_at": round(self.started, 3)}
        if self.error is not None:
            out["error"] = self.error
        if self.kind != "run":
            out |= {"finished": self.finished, "total": self.total,
                    "runs": [r.to_json() for r in self.runs]}
        return out


def list_runs(folders: list[str | Path]) -> list[Entry]:
    """The run, sweep and search directories in `folders` (and in plain folders below them),
    or a folder itself where it is one, oldest first. Named by their path relative to the
    folder; for several folders, with the folder as given in front."""
    roots = [Path(f) for f in folders]
    for root in roots:
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a directory"
            raise CnnlabError(f"{root} {what}; give a folder of runs (runs/, sweeps/, tunes/)")
    entries = []
    for root in roots:
        prefix = f"{root.as_posix().rstrip('/')}/" if len(roots) > 1 else ""
        kind = _kind(root)
        entries += ([_entry(root, prefix.rstrip("/") or root.name, kind)] if kind
                    else _scan(root, root, 0, prefix))
    return _oldest_first(entries)


def _kind(path: Path) -> str | None:
    if (path / SWEEP_FILE).is_file():
        return "sweep"
    if (path / TUNE_FILE).is_file():
        return "tune"
    return "run" if any((path / name).exists() for name in _RUN_MARKS) else None


def _scan(folder: Path, root: Path, depth: int, prefix: str) -> list[Entry]:
    """The entries among `folder`'s subfolders, looking `_MAX_DEPTH` levels into plain ones."""
    entries = []
    try:
        children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return entries
    for child in children:
        if not child.is_dir():
            continue
        kind = _kind(child)
        if kind is not None:
            entries.append(_entry(child, prefix + child.relative_to(root).as_posix(), kind))
        elif depth < _MAX_DEPTH:
            entries += _scan(child, root, depth + 1, prefix)
    return entries


def _oldest_first(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.started, e.name))


def _entry(path: Path, name: str, kind: str) -> Entry:
    return _run_entry(path, name) if kind == "run" else _sweep_entry(path, name, kind)


def _optional_json(path: Path) -> tuple[Any, str | None]:
    """(content, None) of a JSON file; (None, None) where it is missing; (None, what is
    wrong) where it cannot be read."""
    try:
        return read_object(path), None
    except DamagedFile as e:
        return None, f"{path.name} {e.what}"


def _run_entry(path: Path, name: str, pruned: bool = False) -> Entry:
    """A run's row; `pruned`: its search stopped it early."""
    config, error = _optional_json(path / CONFIG)
    if error is None and config is None:
        error = f"{CONFIG} is missing"
    summary, summary_error = _optional_json(path / SUMMARY)
    running = _live(path)
    entry = Entry(path=path, name=name, kind="run", status="running" if running else "damaged",
                  started=_started(path))
    if error:
        entry.error = error
        return entry
    entry.model, entry.dataset = (_text(config.get(k)) for k in ("model", "dataset"))
    entry.epochs = _number(config.get("epochs"))
    if summary_error:
        entry.error = summary_error
        return entry
    records = [] if summary is not None else _tail(path / METRICS)
    _fill_outcome(entry, RunInfo(path=path, name=name, group=name, config=config, env={},
                                 summary=summary, records=records))
    if running:
        return entry
    if summary is not None:
        entry.status, entry.step = "finished", _number(summary.get("steps"), int)
    elif (path / DIVERGED).is_file():
        entry.status, entry.error = "diverged", diverged_error(path)
        entry.step = _diverged_step(path)
    elif entry.step is None:
        entry.status = "not started"
    else:
        entry.status = "pruned" if pruned else "interrupted"
    return entry


def _fill_outcome(entry: Entry, run: RunInfo) -> None:
    """Accuracies, epochs and training time from summary.json or the records read; for an
    unfinished run, the last step recorded and how far its training got."""
    try:
        o = outcome(run)
    except (KeyError, TypeError, ValueError):  # an eval record without its figures
        o = {}
    entry.best_test_acc, entry.final_test_acc, entry.train_seconds = (
        _number(o.get(k)) for k in ("best_test_acc", "final_test_acc", "train_seconds"))
    entry.epochs_done = _number(metric(o, "epochs_done"))
    steps = [s for r in run.records
             if (s := _number(r.get("step", r.get("steps")), int)) is not None]
    entry.step = max(steps, default=None)
    trained = [d for r in run.records if r.get("type") == "train"
               and (d := _number(r.get("epochs_done"))) is not None]
    if trained and (entry.epochs_done is None or trained[-1] > entry.epochs_done):
        entry.epochs_done = trained[-1]


def _live(path: Path) -> bool:
    try:
        return is_locked(path)
    except OSError:  # a lock file this user may not open: no telling, so not running
        return False


def _number(value: Any, kind: type | tuple[type, ...] = (int, float)) -> Any:
    """`value` where it is a number of `kind` (not a bool), else None: a hand-edited file's
    odd value shows as `-`."""
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _diverged_step(path: Path) -> int | None:
    info, _ = _optional_json(path / DIVERGED)
    return _number(info.get("step"), int) if isinstance(info, dict) else None


def _records(data: bytes) -> list[dict]:
    """The JSON object on each whole line of `data` (torn or odd lines are skipped)."""
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _tail(path: Path) -> list[dict]:
    """The train and eval records in the last TAIL_BYTES of metrics.jsonl (for most runs the
    whole file; a longer one's best accuracy is the best of the evaluations there)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    if size > TAIL_BYTES:
        data = data.partition(b"\n")[2]  # the first line is cut
    return [r for r in _records(data) if r.get("type") in ("train", "eval")]


def _started(path: Path) -> float:
    """When the run started: the earliest of config.json's and env.json's times (a resume
    rewrites config.json) and its first telemetry record's; the folder's for none."""
    times = []
    for name in (CONFIG, ENV):
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            pass
    try:
        with (path / METRICS).open("rb") as f:
            head = f.read(_HEAD_BYTES)
        times += [r["time"] for r in _records(head.rpartition(b"\n")[0])
                  if isinstance(r.get("time"), (int, float))][:1]
    except OSError:
        pass
    return min(times) if times else path.stat().st_mtime


def _sweep_entry(path: Path, name: str, kind: str) -> Entry:
    """A sweep's or search's row, with a row for each of its runs."""
    plan, _ = _optional_json(path / (SWEEP_FILE if kind == "sweep" else TUNE_FILE))
    plan = plan if isinstance(plan, dict) else {}
    rows = plan.get("rows") if kind == "tune" else None  # tune.json: each trial's state
    pruned = {str(r.get("run")) for r in rows if isinstance(r, dict)
              and r.get("state") == "pruned"} if isinstance(rows, list) else set()
    try:
        children = sorted(p for p in path.iterdir() if p.is_dir() and _kind(p) == "run")
    except OSError:
        children = []
    runs = [_run_entry(child, f"{name}/{child.name}", pruned=child.name in pruned)
            for child in children]
    planned = plan.get("runs") if kind == "sweep" else plan.get("trials")
    total = len(planned) if isinstance(planned, list) else _number(planned, int)
    total = max(total or 0, len(runs))
    finished = sum(r.status == "finished" for r in runs)
    done = finished + sum(r.status in ("diverged", "pruned") for r in runs)
    status = ("running" if any(r.status == "running" for r in runs)
              else "finished" if done >= total else "incomplete")
    best = [r.best_test_acc for r in runs if r.best_test_acc is not None]
    seconds = [r.train_seconds for r in runs if r.train_seconds is not None]
    return Entry(path=path, name=name, kind=kind, status=status,
                 started=min([path.stat().st_mtime, *(r.started for r in runs)]),
                 model=_text(plan.get("model")) or _joined(r.model for r in runs),
                 dataset=_text(plan.get("dataset")) or _joined(r.dataset for r in runs),
                 best_test_acc=max(best, default=None),
                 train_seconds=sum(seconds) if seconds else None,
                 runs=_oldest_first(runs), finished=finished, total=total)


def _joined(values) -> str | None:
    """The distinct values, in order, comma-separated (None for none)."""
    return ",".join(dict.fromkeys(str(v) for v in values if v is not None)) or None


# ---- the table ---------------------------------------------------------------------------

HEADER = ("name", "kind", "model", "dataset", "status", "best", "final", "epochs",
          "train time", "started")


def status_text(entry: Entry) -> str:
    """The status as the table says it: `interrupted at step 120`, `3 of 4 finished, 1
    running`, `damaged (config.json is unreadable)`."""
    if entry.kind != "run":
        counts = [f"{entry.finished} of {entry.total} finished"]
        for state in ("running", "diverged", "interrupted", "pruned", "damaged"):
            n = sum(r.status == state for r in entry.runs)
            if n:
                counts.append(f"{n} {state}")
        return ", ".join(counts)
    if entry.status == "diverged":
        return entry.error or "diverged"
    if entry.status == "damaged":
        return f"damaged ({entry.error})"
    if entry.status in ("interrupted", "pruned", "running") and entry.step is not None:
        return f"{entry.status} at step {entry.step}"
    return entry.status


def format_table(entries: list[Entry], *, expand: bool = False) -> str:
    """The entries as an aligned table; `expand`: each sweep's runs indented below it."""
    rows = []
    for entry in entries:
        rows.append(_cells(entry))
        if expand:
            rows += [_cells(run, indent="  ") for run in entry.runs]
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [HEADER, *rows])


def _cells(entry: Entry, indent: str = "") -> tuple[str, ...]:
    epochs = "-" if entry.epochs_done is None and entry.epochs is None else \
        f"{format_epochs(entry.epochs_done)}/{format_epochs(entry.epochs)}"
    return (indent + entry.name, entry.kind, entry.model or "-", entry.dataset or "-",
            status_text(entry), pct_text(entry.best_test_acc), pct_text(entry.final_test_acc),
            epochs, _duration(entry.train_seconds), _local_time(entry.started))


def _duration(seconds: float | None) -> str:
    """12.3 s, 4m 05s, 2h 03m."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m {int(seconds % 60):02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _local_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))
