"""Sweeps as Optuna studies: every point trained once however many workers start at the same
moment, a dead worker's point continued from its checkpoint by another, no worker outliving
its sweep, and one line for a storage that cannot be used."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cnnlab.cli import main
from cnnlab.runs import read_metrics
from cnnlab.study import Study

TIMING = ("time", "second", "resumed")


def _take_all(url: str, queue) -> None:
    study = Study(url, "race", {"p": 1}, points=[{"run": f"r{i}"} for i in range(30)])
    taken = []
    while (trial := study.take()) is not None:
        taken.append(trial.user_attrs["run"])
        study.finish(trial, 1.0)
    queue.put(taken)


def test_workers_created_at_the_same_moment_take_every_point_once(tmp_path):
    """Six workers open a new SQLite storage and create the study at once: the creator alone
    queues the points, and each is taken by exactly one worker."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_take_all, args=(url, queue)) for _ in range(6)]
    for w in workers:
        w.start()
    taken = [run for _ in workers for run in queue.get(timeout=120)]
    for w in workers:
        w.join(timeout=60)
    assert sorted(taken) == sorted(f"r{i}" for i in range(30))
    assert [w.exitcode for w in workers] == [0] * 6


def _sweep_cmd(data, out, *extra):
    return [sys.executable, "-m", "cnnlab", "sweep", "lenet5", "mnist", "--data-dir", str(data),
            "--batch-size", "32", "--telemetry", "0", "--out", str(out), *extra]


def _records(run_dir):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)}
            for r in read_metrics(run_dir) if r["type"] != "telemetry"]


def test_two_sweeps_into_one_directory_share_its_points(tiny_mnist, tmp_path):
    """Two `cnnlab sweep` commands started together into one --out are two workers of one
    study: both end well, and each run is trained once, as by one command alone."""
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(tiny_mnist, out, "--grid", "pool=max,avg", "--seeds", "2", "--epochs", "1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    err = "".join(e for _, e in outputs)
    runs = ["pool=max-seed=0", "pool=avg-seed=0", "pool=max-seed=1", "pool=avg-seed=1"]
    for run in runs:
        assert err.count(f"{run}: training") == 1, err
        evals = [r for r in read_metrics(out / run) if r["type"] == "eval"]
        assert len(evals) == 1  # trained once, not twice into the same directory
    alone = tmp_path / "alone"
    assert subprocess.run(_sweep_cmd(tiny_mnist, alone, "--grid", "pool=max,avg", "--seeds", "2",
                                     "--epochs", "1"), capture_output=True).returncode == 0
    assert all(_records(out / r) == _records(alone / r) for r in runs)


def _wait_for(path: Path, proc, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_killed_workers_point_is_continued_from_its_checkpoint(tiny_mnist, tmp_path):
    """SIGKILL the only worker mid-point; a worker started after is told by the silent
    heartbeat that the point is free and continues it from its checkpoint: the same run,
    record for record, as one never stopped."""
    env = {**os.environ, "CNNLAB_HEARTBEAT": "1"}
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(tiny_mnist, out, "--grid", "lr=0.05", "--epochs", "3", "--log-every", "4",
                     "--checkpoint-every", "8")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    run = out / "lr=0.05-seed=0"
    _wait_for(run / "checkpoint.pt", first)
    first.kill()
    first.communicate()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "lr=0.05-seed=0: continuing from its checkpoint" in second.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0
    reference = tmp_path / "reference"
    assert subprocess.run(_sweep_cmd(tiny_mnist, reference, "--grid", "lr=0.05", "--epochs", "3",
                                     "--log-every", "4", "--checkpoint-every", "8"),
                          capture_output=True).returncode == 0
    assert _records(run) == _records(reference / "lr=0.05-seed=0")


def test_no_worker_outlives_a_killed_sweep(tiny_mnist, tmp_path):
    """SIGKILL of `cnnlab sweep --jobs 2`: its workers stop within seconds (checkpointing,
    their points back in the queue), and the same command continues both runs."""
    out = tmp_path / "sweep"
    # long enough that neither run ends before both have a checkpoint, short enough that
    # the command run again finishes them soon
    cmd = _sweep_cmd(tiny_mnist, out, "--grid", "pool=max,avg", "--epochs", "30",
                     "--log-every", "1", "--jobs", "2", "--quiet")
    env = {**os.environ, "CNNLAB_HEARTBEAT": "1"}  # a point of a dead worker: free in 3 s
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    runs = [out / "pool=max-seed=0", out / "pool=avg-seed=0"]
    for run in runs:
        _wait_for(run / "checkpoint.pt", sweep)
    workers = psutil.Process(sweep.pid).children(recursive=True)
    sweep.send_signal(signal.SIGKILL)
    _, err = sweep.communicate()  # to its end: the workers write to the same pipe
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    for run in runs:  # each stopped as on SIGTERM: a checkpoint, the lock let go
        assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert all((run / "summary.json").is_file() for run in runs)


@pytest.mark.parametrize("storage, message", [
    ("postgresql://nobody@127.0.0.1:1/none", "cannot open the study storage "
                                             "postgresql://nobody@127.0.0.1:1"),
    ("postgresql+psycopg2://nobody@127.0.0.1:1/none", "cannot open the study storage "
                                                      "postgresql+psycopg2://nobody@127.0.0.1:1"),
    ("nosuchdb://x", "cannot open the study storage nosuchdb://x"),
])
def test_a_storage_that_cannot_be_used_is_one_line(tiny_mnist, tmp_path, capsys, storage,
                                                   message):
    assert main(["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid",
                 "lr=0.05", "--out", str(tmp_path / "s"), "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cnnlab: error: {message}"), err


def test_a_study_of_another_sweep_is_refused(tiny_mnist, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Study(url, "lab", {"another": "sweep"}, points=[])
    assert main(["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid",
                 "lr=0.05", "--out", str(tmp_path / "s"), "--storage", url, "--study",
                 "lab"]) == 2
    assert "holds a study named 'lab' of another sweep" in capsys.readouterr().err


def test_a_killed_worker_of_jobs_2_is_one_line_and_its_point_is_taken_over(tiny_mnist,
                                                                           tmp_path):
    """SIGKILL one of `--jobs 2`'s workers: the other takes its point over once its heartbeat
    is stale, and the sweep ends with one line saying a worker was killed."""
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(tiny_mnist, out, "--grid", "pool=max,avg", "--epochs", "20",
                     "--log-every", "1", "--jobs", "2", "--quiet")
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "CNNLAB_HEARTBEAT": "1"})
    runs = [out / "pool=max-seed=0", out / "pool=avg-seed=0"]
    for run in runs:
        _wait_for(run / "checkpoint.pt", sweep)
    workers = [p for p in psutil.Process(sweep.pid).children()
               if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[0].kill()
    _, err = sweep.communicate(timeout=300)
    assert "Traceback" not in err and "EOFError" not in err, err
    assert sweep.returncode == 2
    assert err.strip().splitlines()[-1] == "cnnlab: error: a worker was killed (SIGKILL)"
    assert all((run / "summary.json").is_file() for run in runs)
