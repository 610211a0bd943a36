"""What `cnnlab train --nproc 2` prints: a one-process run's lines wherever they go (a file
with both streams, a terminal), the run directory last and alone on stdout, one line when a
rank dies; and `--quiet`: the run directory alone."""

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import psutil
import pytest
from conftest import write_mnist

from cnnlab import checkpoint
from cnnlab.cli import main

ARGS = ["--epochs", "2", "--batch-size", "32", "--log-every", "4", "--telemetry", "0",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("launch") / "data", 256, 64)


def _nproc2(data, out, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "lenet5", "mnist",
                             "--nproc", "2", "--data-dir", str(data), "--out", str(out),
                             *args], env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def _heads(lines: list[str]) -> list[str]:
    """Each line up to its first colon ("epoch 1/2 step 4/16", "epoch 1/2", "lenet5 on
    mnist"): what two runs' lines share; a line torn by another one would not."""
    return [line.split(":")[0] for line in lines]


def test_a_file_with_both_streams_holds_the_lines_of_one_process(data, tmp_path, capsys):
    assert main(["train", "lenet5", "mnist", "--data-dir", str(data),
                 "--out", str(tmp_path / "one"), *ARGS]) == 0
    out, err = capsys.readouterr()
    one = err.splitlines() + out.splitlines()
    assert one[-1] == str(tmp_path / "one")

    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = _nproc2(data, tmp_path / "two", *ARGS, stdout=f, stderr=subprocess.STDOUT)
        assert proc.wait(timeout=300) == 0, log.read_text()
    two = log.read_text().splitlines()
    assert _heads(two[:-1]) == _heads(one[:-1]), two  # nothing torn, lost, doubled or added
    assert two[-1] == str(tmp_path / "two")


def test_a_terminal_gets_the_bar_and_stdout_the_run_directory_alone(data, tmp_path):
    terminal, ours = pty.openpty()
    fcntl.ioctl(ours, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with open(tmp_path / "stdout", "w") as f:
        proc = _nproc2(data, tmp_path / "run", *ARGS, stdout=f, stderr=ours)
    os.close(ours)
    screen = b""
    while select.select([terminal], [], [], 300)[0]:
        try:
            screen += os.read(terminal, 1 << 16)
        except OSError:  # every writer closed it
            break
    os.close(terminal)
    assert proc.wait(timeout=60) == 0, screen
    assert (tmp_path / "stdout").read_text() == f"{tmp_path / 'run'}\n"
    text = screen.decode()
    assert "16/16 [" in text and "\r" in text  # rank 0's bar, drawn on the terminal
    assert text.count("lenet5 on mnist: final test accuracy") == 1


def test_a_rank_killed_is_one_line_with_how_to_resume(data, tmp_path):
    out = tmp_path / "run"
    proc = _nproc2(data, out, "--epochs", "100", "--batch-size", "8", "--log-every", "1",
                   "--checkpoint-every", "2", "--telemetry", "0", "--device", "cpu",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").is_file():
        time.sleep(0.1)
    rank1 = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1")
    rank1.kill()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert [line for line in stderr.splitlines() if "error" in line.lower()] == [
        f"cnnlab: error: rank 1 died (killed by SIGKILL); its last checkpoint is intact - "
        f"resume with: cnnlab train --resume {out}"]
    assert checkpoint.load(out / "checkpoint.pt")["step"] >= 2


def test_quiet_prints_the_run_directory_alone(data, tmp_path, capsys):
    assert main(["train", "lenet5", "mnist", "--data-dir", str(data),
                 "--out", str(tmp_path / "run"), *ARGS, "--quiet"]) == 0
    assert capsys.readouterr() == (f"{tmp_path / 'run'}\n", "")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "errors (and notes) on stderr and the run directory on stdout" in " ".join(
        capsys.readouterr().out.split())
