"""Faults of a study's storage: each ends in one line within a bounded time, or is waited
out - nothing lost, nothing trained twice. Workers run on network-namespace hosts (hosts.py)
with PostgreSQL, or a listener that never answers, on another.

    a server that accepts and never answers   one line within the connect timeout; SIGTERM
                                              ends the worker within seconds
    a host whose link is down                 one line within the connect timeout
    the link cut as a point finishes          the worker waits, then records it: exit 0
    a worker cut off past the grace period    another takes its point over; when the link
                                              returns the first says so in one line
    PostgreSQL stopped for 30 s at a point's  the worker waits for it: exit 0
    end
    a read-only study.db                      one line
"""

import contextlib
import signal
import subprocess
import threading
import time

import optuna
import pytest
from conftest import write_folder
from hosts import PYTHON, network, postgres

from cnnlab.cli import main
from cnnlab.study import CONNECT_TIMEOUT

RUNS = ["lr=0.02-seed=0", "lr=0.05-seed=0", "lr=0.02-seed=1", "lr=0.05-seed=1"]
ENV = {"OMP_NUM_THREADS": "1", "CNNLAB_HEARTBEAT": "1"}

# A listener that accepts every connection and never says a word.
SILENT = """if True:
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", int(sys.argv[1]))); s.listen(16)
    print("listening", flush=True)
    held = []
    while True:
        held.append(s.accept()[0])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("faultdata") / "pets", n_train=8, n_test=4)


def _sweep(data, out, url, epochs="20") -> list[str]:
    return [PYTHON, "-m", "cnnlab", "sweep", "lenet5", f"folder:{data}", "--grid",
            "lr=0.02,0.05", "--seeds", "2", "--epochs", epochs, "--batch-size", "4",
            "--log-every", "2", "--telemetry", "0", "--out", str(out), "--storage", url]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("cnnlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _wait_for(path, proc, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


class Lines:
    """A process's stderr read as it comes, each line with the moment it came."""

    def __init__(self, proc) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc) -> None:
        for line in proc.stderr:
            self.lines.append((time.monotonic(), line))

    def text(self) -> str:
        self.thread.join(timeout=60)
        return "".join(line for _, line in self.lines)

    def after(self, moment: float, text: str = "") -> str:
        """Seconds from `moment` to the first line after it holding `text` ("none": none)."""
        found = [t for t, line in self.lines if text in line and t >= moment]
        return f"{found[0] - moment:.1f} s" if found else "none"


def _trained_once(err: str, out) -> None:
    for run in RUNS:
        assert err.count(f"{run}: training") == 1, err
        assert (out / run / "summary.json").is_file()


def test_a_server_that_never_answers_is_one_line_and_a_signal_ends_the_wait(data, tmp_path):
    with network(2) as (a, b):
        port = a.free_port()
        listener = a.popen([PYTHON, "-c", SILENT, str(port)], stdout=subprocess.PIPE)
        assert listener.stdout.readline() == "listening\n"
        url = f"postgresql://lab@{a.addr}:{port}/sweeps"
        started = time.monotonic()
        done = b.run(_sweep(data, tmp_path / "s1", url), check=False, timeout=120, env=ENV)
        took = time.monotonic() - started
        assert done.returncode == 2
        assert "cannot open the study storage postgresql://lab@" in _one_line(done.stderr)
        assert took < CONNECT_TIMEOUT + 20, took  # the rest: starting Python, torch
        print(f"never answers: one line after {took:.1f} s")

        worker = b.popen(_sweep(data, tmp_path / "s2", url), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        time.sleep(5)  # waiting on the silent server by now
        worker.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, err = worker.communicate(timeout=60)
        took = time.monotonic() - stopped
        assert took < 5, err
        assert worker.returncode == 143 and "Traceback" not in err, err
        print(f"SIGTERM while it waits: ended after {took:.1f} s")

        a.cut()  # a host that drops every packet
        started = time.monotonic()
        done = b.run(_sweep(data, tmp_path / "s3", url), check=False, timeout=120, env=ENV)
        took = time.monotonic() - started
        assert done.returncode == 2 and "cannot open the study storage" in _one_line(
            done.stderr)
        assert took < CONNECT_TIMEOUT + 20, took
        print(f"packets dropped: one line after {took:.1f} s")


def _waited_out(data, out, fault: str, seconds: float) -> None:
    """One worker on a host, PostgreSQL on another; once the worker's first point has
    finished, `fault` ("cut": the worker's link; "stop": the server) for `seconds`. The
    worker waits it out: exit 0, each point trained once."""
    with network(2) as (db, b), postgres(db) as server:
        # points long enough that the fault comes while the others remain
        worker = b.popen(_sweep(data, out, server.url, epochs="80"), env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines = Lines(worker)
        _wait_for(out / RUNS[0] / "summary.json", worker)
        began = time.monotonic()
        b.cut() if fault == "cut" else server.stop()
        time.sleep(seconds)
        b.mend() if fault == "cut" else server.start()
        ended = time.monotonic()
        try:
            worker.wait(timeout=300)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            pytest.fail(f"the worker did not end: {lines.text()[-3000:]}")
        err = lines.text()
    assert worker.returncode == 0, err
    assert "cnnlab: lost contact with the study storage while" in err, err
    print(f"{fault} for {seconds} s: its line after {lines.after(began, 'lost contact')}; the "
          f"next line {lines.after(ended)} after it ended")
    _trained_once(err, out)


def test_the_link_cut_as_a_point_finishes_is_waited_out(data, tmp_path):
    # longer than the kernel's patience with unanswered data (15 s)
    _waited_out(data, tmp_path / "sweep", "cut", 18)


def test_postgres_stopped_for_30_s_around_a_points_end_is_waited_out(data, tmp_path):
    _waited_out(data, tmp_path / "sweep", "stop", 30)


def test_a_worker_cut_off_has_its_point_taken_over_and_says_so(data, tmp_path):
    out = tmp_path / "sweep"
    with network(3) as (db, b, c), postgres(db) as server:
        first = b.popen(_sweep(data, out, server.url, epochs="30"), env=ENV,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for(out / RUNS[0] / "checkpoint.pt", first)
        b.cut()  # b trains on, its heartbeat lost: c fails its trial and queues it again
        second = c.popen(_sweep(data, out, server.url, epochs="30"), env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for(out / RUNS[0] / "summary.json", first, 300)
        time.sleep(3)
        b.mend()
        ends = [w.communicate(timeout=600) for w in (first, second)]
    assert [w.returncode for w in (first, second)] == [0, 0], ends
    assert "was taken over by another worker while this one had no contact with the " \
           "storage" in ends[0][1]
    _trained_once(ends[0][1] + ends[1][1], out)


def test_a_read_only_study_is_one_line(tmp_path, capsys):
    from conftest import write_mnist

    data = write_mnist(tmp_path / "data", n_train=64, n_test=16)
    args = ["sweep", "lenet5", "mnist", "--data-dir", str(data), "--grid", "lr=0.05",
            "--epochs", "0.5", "--telemetry", "0", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    db = tmp_path / "s" / "study.db"
    (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
    (tmp_path / "s" / "lr=0.05-seed=0" / "summary.json").unlink()  # a point to record
    capsys.readouterr()
    assert main([*args, "--storage", f"sqlite:///file:{db}?mode=ro&uri=true",
                 "--study", name]) == 2
    err = capsys.readouterr().err
    assert "readonly" in _one_line(err), err


def test_a_disk_that_fills_under_the_study_is_one_line_and_the_sweep_continues(data, tmp_path):
    """The study's SQLite file on a small disk (tmpfs) that fills while a point trains: the
    worker ends in one line when it records the point; with space again the same command
    continues that point from its checkpoint and trains the others, each once."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small disk needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cmd = _sweep(data, tmp_path / "sweep", f"sqlite:///{disk / 'study.db'}", epochs="60")
        env = {**os.environ, **ENV}
        worker = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        _wait_for(tmp_path / "sweep" / RUNS[0] / "checkpoint.pt", worker)
        with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 2, err
        assert "disk is full" in _one_line(err)
        (disk / "filler").unlink()
        time.sleep(3.5)  # the stopped point's heartbeat is stale: any worker may take it
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        _trained_once(err + done.stderr, tmp_path / "sweep")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
