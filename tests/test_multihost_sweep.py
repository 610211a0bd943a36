"""One sweep, workers on two hosts, its study in PostgreSQL on a third (hosts.py): 8 points x
2 seeds give 16 run directories, each trained once, and the results of one worker alone;
SIGKILL one worker mid-point and the other finishes that point from its checkpoint (once the
dead worker's heartbeat is stale), with the same results again."""

import csv
import os
import signal
import subprocess
import time

import pytest
from conftest import write_folder
from hosts import PYTHON, network, postgres_server

from cnnlab.runs import read_metrics

POINTS = "lr=0.01,0.02,0.03,0.04,0.05,0.06,0.07,0.08"
RUNS = [f"lr={lr}-seed={seed}" for seed in (0, 1) for lr in POINTS[3:].split(",")]
ENV = {"OMP_NUM_THREADS": "1", "CNNLAB_HEARTBEAT": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sweepdata") / "pets", n_train=8, n_test=4)


def _sweep(data, out, *extra) -> list[str]:
    return [PYTHON, "-m", "cnnlab", "sweep", "lenet5", f"folder:{data}", "--grid", POINTS,
            "--seeds", "2", "--epochs", "4", "--batch-size", "4", "--log-every", "2",
            "--checkpoint-every", "3", "--telemetry", "0", "--out", str(out), *extra]


def _results(out) -> list[dict]:
    with (out / "results.csv").open() as f:
        return [{k: v for k, v in row.items() if "seconds" not in k and "per_second" not in k}
                for row in csv.DictReader(f)]


def _records(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if "second" not in k}
            for r in read_metrics(run_dir) if r["type"] != "telemetry"]


@pytest.fixture(scope="module")
def alone(data, tmp_path_factory):
    """The sweep on one worker, its study in SQLite (one thread, as each worker has)."""
    out = tmp_path_factory.mktemp("alone") / "sweep"
    done = subprocess.run(_sweep(data, out), capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("kill", [False, True], ids=["two-workers", "one-killed"])
def test_workers_on_two_hosts_share_one_postgresql_study(data, alone, tmp_path, kill):
    out = tmp_path / "sweep"
    with network(3) as (db, b, c), postgres_server(db) as url:
        cmd = _sweep(data, out, "--storage", url)

        def start(host):
            return host.popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        if not kill:  # both at the same moment
            workers = [start(b), start(c)]
        else:  # the first alone until a run of its own is half done; killed once the second
            workers = [start(b)]  # has started
            deadline = time.monotonic() + 120
            while not any((out / r / "checkpoint.pt").is_file()
                          and not (out / r / "summary.json").exists() for r in RUNS):
                assert time.monotonic() < deadline and workers[0].poll() is None
                time.sleep(0.02)
            workers.append(start(c))
            workers[0].send_signal(signal.SIGKILL)
        ends = [w.communicate(timeout=300) for w in workers]
    survivor = ends[1][1]
    assert workers[1].returncode == 0, survivor
    if kill:
        assert workers[0].returncode == -signal.SIGKILL
        assert "continuing from its checkpoint" in survivor
    else:
        assert workers[0].returncode == 0, ends[0][1]
    err = ends[0][1] + survivor
    trained = [r for r in RUNS if f"{r}: training" in err]
    assert sorted(trained) == sorted(RUNS) and all(err.count(f"{r}: training") == 1
                                                   for r in RUNS)  # each trained once
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(RUNS)
    for run in RUNS:
        assert _records(out / run) == _records(alone / run), run
    assert _results(out) == _results(alone)
