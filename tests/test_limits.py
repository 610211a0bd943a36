"""What a process may use of the machine: its CPUs (affinity, cgroup quota, other processes'
load) and its memory."""

import subprocess
import sys
import time

import pytest

from cnnlab import limits


def test_usable_cpus_are_those_of_the_affinity_at_most():
    import os

    assert 1 <= limits.usable_cpus() <= len(os.sched_getaffinity(0))


def test_default_threads_take_omp_num_threads_else_the_cpus_others_leave(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert limits.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(limits, "usable_cpus", lambda: 4)
    for busy, threads in ((0.0, 4), (0.4, 4), (1.6, 2), (3.9, 1), (7.0, 1)):
        monkeypatch.setattr(limits, "others_busy", lambda b=busy: b)
        assert limits.default_threads() == threads


def test_others_busy_sees_a_busy_process_and_not_this_one():
    limits.others_busy()  # a fresh window from here
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # this process busy too: not counted
            pass
        busy = limits.others_busy()
    finally:
        spin.kill()
        spin.wait()
    assert 0.5 <= busy, busy


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_run_records_the_threads_it_trained_with(tmp_path, threads):
    import json

    from conftest import write_mnist

    data = write_mnist(tmp_path / "d", 64, 16)
    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist",
                           "--data-dir", str(data), "--epochs", "0.25", "--threads", threads,
                           "--telemetry", "0", "--quiet", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["torch_threads"] == int(threads) and env["cpus_usable"] >= 1
