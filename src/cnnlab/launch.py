"""`cnnlab train --nproc N`: torchrun on this machine, and what the ranks tell the launcher.

The output has the shape of a one-process run's, wherever it goes. The ranks write their
stderr to the launcher's terminal, or else to a FIFO that a thread of the launcher copies to
its stderr: two processes writing to one file through their own file descriptions would
overwrite each other's lines. What they print on stdout (rank 0's run directory) the
launcher prints once all have ended, so it comes last. torchrun's own messages go to a log,
shown only when a rank ended before it could say anything itself.

Nothing here imports torch: the command calls it at start and at exit, and a stop during
start-up may have interrupted torch's own import."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import Exit
from .limits import usable_cpus
from .rank import env_rank
from .runs import CHECKPOINT, CONFIG
from .stops import StopSignals

LAUNCH_DIR = "CNNLAB_LAUNCH_DIR"  # where each rank leaves its pid, exit status, last words
RANK_STDERR = "CNNLAB_RANK_STDERR"  # what the ranks write stderr to: a terminal or a FIFO


def cores_per_process(count: int) -> int:
    """Each of `count` processes' share of the CPUs this process may use, at least one."""
    return max(1, usable_cpus() // count)


@dataclass(frozen=True)
class Nodes:
    """The machines of a run on several (`--nnodes`): how many, this one's rank, and where
    they meet (the machine of rank 0), waiting for each other at most `timeout` seconds."""

    count: int
    rank: int
    addr: str
    port: int
    timeout: float

    def torchrun(self) -> list[str]:
        return [f"--nnodes={self.count}", f"--node-rank={self.rank}",
                f"--master-addr={self.addr}", f"--master-port={self.port}",
                "--rdzv-conf", f"timeout={math.ceil(self.timeout)}"]

    def resume(self, run_dir: Path, nproc: int) -> str:
        """The command that resumes the run, on this machine (the others: their rank)."""
        procs = f" --nproc {nproc}" if nproc > 1 else ""
        return (f"cnnlab train --resume {run_dir} --nnodes {self.count} --node-rank "
                f"{self.rank} --master-addr {self.addr} --master-port {self.port}{procs} here, "
                "and the same with its own --node-rank on every other machine")


# Seconds a rank may take to start once the machines have met (Python, torch, cnnlab), on
# top of --rdzv-timeout, before a launcher with no rank started gives up
START_ALLOWANCE = 60.0


def launch(nproc: int, args: list[str], run_dir: str | Path, nodes: Nodes | None = None) -> int:
    """Run `cnnlab ARGS` as `nproc` processes under torchrun (on each of `nodes`' machines,
    where given), training into `run_dir`, and return the ranks' own exit status: rank 0's,
    else the first failing rank's (torchrun itself reports any failure as 1). SIGINT and
    SIGTERM go to the ranks, which checkpoint and stop. A rank that dies (no exit status:
    SIGKILL, the kernel's out-of-memory killer) is reported in one line, with 128 + the
    signal that killed it, and the command that resumes the run; machines that do not all
    start within the rendezvous timeout are one line too."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-launch-") as name:
        folder = Path(name)
        # each rank its share of the cores (torchrun would give each one thread, and say so)
        env = {"OMP_NUM_THREADS": str(cores_per_process(nproc)), **os.environ,
               LAUNCH_DIR: name}
        if os.isatty(2):  # no file offset to clash over, and rank 0 draws its bar there
            env[RANK_STDERR], drain = os.ttyname(2), None
        else:
            env[RANK_STDERR] = str(folder / "stderr")
            drain = _relay(folder / "stderr")
        cmd = [sys.executable, "-m", "torch.distributed.run",
               *(nodes.torchrun() if nodes else ["--standalone"]),
               f"--nproc_per_node={nproc}", "-m", "cnnlab", *args]
        with open(folder / "torchrun.log", "w+") as log, open(folder / "stdout", "w+b") as out:
            # its own session: a Ctrl-C in the terminal reaches the launcher alone, which
            # passes it on to the ranks once (torchrun would pass it again: a second Ctrl-C)
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=log,
                                    start_new_session=True)
            code = _wait(proc, folder, None if nodes is None
                         else nodes.timeout + START_ALLOWANCE)
            if drain:
                drain()
            log.seek(0)
            code = _outcome(folder, nproc, code, log.read(), Path(run_dir), nodes)
            out.seek(0)
            printed = out.read()
    sys.stderr.flush()
    sys.stdout.buffer.write(printed)
    sys.stdout.flush()
    return code


def _outcome(folder: Path, nproc: int, code: int, report: str, run_dir: Path,
             nodes: Nodes | None) -> int:
    """The exit status, from what the ranks left in `folder` and torchrun's exit status
    `code` and `report`; a rank that died, or lost the others with nothing else to explain
    it, or machines that never met, are reported here."""
    statuses = {_rank(f): int(f.read_text() or 1) for f in folder.glob("status-*")}
    started = {_rank(f) for f in folder.glob("pid-*")}
    first = nodes.rank * nproc if nodes else 0  # this machine's ranks: first, first + 1, ...
    died = [r for r in range(first, first + nproc) if r not in statuses] if code else []
    if nodes and code and not started:
        return _never_met(nodes, code, report)
    if died and not set(died) <= started:
        sys.stderr.write(report)  # it ended before it wrote to us: torchrun's log has its words
        return code
    then = f"; resume with: {nodes.resume(run_dir, nproc)}" if nodes else ""
    if died:
        return _report_deaths(died, report, run_dir, then) or code
    lost = sorted(folder.glob("lost-*"))
    if {r for r, s in statuses.items() if s} <= {_rank(f) for f in lost}:
        for f in lost:  # no other failure explains it
            print(f"cnnlab: error: {f.read_text()}{then}", file=sys.stderr)
    return next((statuses[r] for r in sorted(statuses) if statuses[r]), 0)


def _never_met(nodes: Nodes, code: int, report: str) -> int:
    """Say in one line that the machines did not all start within the rendezvous timeout
    (with torch's own last word on it, where it gave one)."""
    said = [line.strip() for line in report.splitlines()
            if re.match(r"\s*torch\.distributed\.\w+Error: ", line)]
    why = f" ({said[-1].split(': ', 1)[1][:160]})" if said else ""
    print(f"cnnlab: error: the {nodes.count} machines did not all start within --rdzv-timeout "
          f"{nodes.timeout:g} s{why}; run the same command on every machine, --node-rank 0 on "
          f"{nodes.addr} (which the others must reach on port {nodes.port})", file=sys.stderr)
    return code if code > 0 else Exit.BAD_INPUT


def _rank(file: Path) -> int:
    return int(file.name.split("-")[1])


def _relay(fifo: Path) -> Callable[[], None]:
    """Copy what the ranks write to the FIFO `fifo` to our stderr, from a thread; the
    function returned waits until every rank has closed it and all is copied. Each line a
    rank writes is one write, which a FIFO never splits (up to 4 KiB)."""
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: would block
    ours = os.open(fifo, os.O_WRONLY)  # held: no end of file before the ranks open theirs
    os.set_blocking(reader, True)

    def copy() -> None:
        while chunk := os.read(reader, 1 << 16):
            with contextlib.suppress(OSError):  # our stderr closed: the ranks go on
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
        os.close(reader)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()

    def drain() -> None:
        os.close(ours)
        thread.join()

    return drain


def _wait(proc: subprocess.Popen, folder: Path, start_within: float | None = None) -> int:
    """torchrun's exit status, passing SIGINT and SIGTERM on to the ranks meanwhile; with
    `start_within`, torchrun is stopped (status 1) when no rank has started by then."""

    def forward(signum: int) -> None:
        pids = [f.read_text() for f in folder.glob("pid-*")]
        if not pids:  # still starting: stop all of it
            os.killpg(proc.pid, signum)
        for pid in pids:
            try:
                os.kill(int(pid), signum)
            except (ProcessLookupError, ValueError):
                pass

    with StopSignals(None, pass_on=forward):  # rank 0 says it stops
        if start_within is None:
            return proc.wait()
        deadline = time.monotonic() + start_within
        while proc.poll() is None:
            if time.monotonic() > deadline and not any(folder.glob("pid-*")):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                return 1
            time.sleep(0.2)
        return proc.returncode


def _report_deaths(died: list[int], report: str, run_dir: Path, then: str = "") -> int | None:
    """Say in one line which ranks died, how (torchrun's `report` gives each failed rank's
    exit code, negative for a signal) and how to go on; return 128 + the first one's signal,
    or its exit status (None if the report does not say)."""
    codes = {int(r): int(c) for r, c in re.findall(
        r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s+exitcode\s*:\s*(-?\d+)", report)}

    def how(rank: int) -> str:
        code = codes.get(rank)
        if code is None:
            return ""
        return f" (killed by {_signal_name(-code)})" if code < 0 else f" (exit status {code})"

    if then:  # on many machines: every one resumes, each with its rank
        then = then.removeprefix("; ")
    elif (run_dir / CHECKPOINT).is_file():
        then = f"its last checkpoint is intact - resume with: cnnlab train --resume {run_dir}"
    elif (run_dir / CONFIG).is_file():
        then = f"no checkpoint yet - start it over with: cnnlab train --resume {run_dir}"
    else:
        then = "nothing was written - run the same command again"
    deaths = ", ".join(f"rank {r} died{how(r)}" for r in died)
    print(f"cnnlab: error: {deaths}; {then}", file=sys.stderr)
    first = codes.get(died[0])
    if first is None:
        return None
    return Exit.for_signal(-first) if first < 0 else first


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal
        return f"signal {signum}"


def rank_started() -> None:
    """Under `--nproc`: write stderr where the launcher says (its terminal, or the FIFO it
    copies from) and tell it this rank's pid."""
    folder = os.environ.get(LAUNCH_DIR)
    if not folder:
        return
    sys.stderr.flush()
    fd = os.open(os.environ[RANK_STDERR], os.O_WRONLY | os.O_NOCTTY)
    os.dup2(fd, 2)
    os.close(fd)
    (Path(folder) / f"pid-{env_rank()}").write_text(str(os.getpid()))


def leave_to_launcher(message: str) -> bool:
    """Under `--nproc`: leave `message`, that this rank lost the others, to the launcher, and
    return True (False without one). It prints it only when nothing else explains it: no
    rank died or failed otherwise."""
    folder = os.environ.get(LAUNCH_DIR)
    if folder:
        (Path(folder) / f"lost-{env_rank()}").write_text(message)
    return folder is not None


def rank_finished(code: int) -> None:
    """Under `--nproc`: tell the launcher this rank's exit status."""
    folder = os.environ.get(LAUNCH_DIR)
    if folder:
        (Path(folder) / f"status-{env_rank()}").write_text(str(int(code)))
