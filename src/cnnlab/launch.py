"""`cnnlab train --nproc N`: torchrun on this machine, and what the ranks tell the launcher.

Nothing here imports torch: the command calls it at start and at exit, and a stop during
start-up may have interrupted torch's own import."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def env_rank() -> int:
    """This process's rank as torchrun's environment gives it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


LAUNCH_DIR = "CNNLAB_LAUNCH_DIR"  # where each rank leaves its pid and exit status
LAUNCHER_STDERR = "CNNLAB_LAUNCHER_STDERR"  # the launcher's stderr, for the ranks to write to


def cores_per_process(count: int) -> int:
    """Each of `count` processes' share of this machine's cores, at least one."""
    return max(1, (os.cpu_count() or 1) // count)


def launch(nproc: int, args: list[str]) -> int:
    """Run `cnnlab ARGS` as `nproc` processes under torchrun and return the ranks' own exit
    status: rank 0's, else the first failing rank's (torchrun itself reports any failure as
    1). SIGINT and SIGTERM go to the ranks, which checkpoint and stop; torchrun's report of
    a failing rank stays out of the output unless a rank died without a status."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-launch-") as folder:
        # each rank its share of the cores (torchrun would give each one thread, and say so)
        env = {"OMP_NUM_THREADS": str(cores_per_process(nproc)), **os.environ,
               LAUNCH_DIR: folder}
        own_stderr = Path(f"/proc/{os.getpid()}/fd/2")
        log = None
        if own_stderr.exists():  # Linux: the ranks write to ours, torchrun to a log
            env[LAUNCHER_STDERR] = str(own_stderr)
            log = open(Path(folder) / "torchrun.log", "w+")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "cnnlab", *args]
        # its own session: a Ctrl-C in the terminal reaches the launcher alone, which passes
        # it on to the ranks once (torchrun would pass it again: a second Ctrl-C)
        proc = subprocess.Popen(cmd, env=env, stderr=log, start_new_session=True)

        def forward(signum, frame) -> None:
            pids = [f.read_text() for f in Path(folder).glob("pid-*")]
            if not pids:  # still starting: stop all of it
                os.killpg(proc.pid, signum)
            for pid in pids:
                try:
                    os.kill(int(pid), signum)
                except (ProcessLookupError, ValueError):
                    pass

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        statuses = {int(f.name.split("-")[1]): int(f.read_text() or 1)
                    for f in Path(folder).glob("status-*")}
        if log is not None:
            if len(statuses) < nproc and code != 0:  # a rank died: torchrun says which
                log.seek(0)
                sys.stderr.write(log.read())
            log.close()
    if len(statuses) < nproc:
        return code
    return next((statuses[r] for r in sorted(statuses) if statuses[r]), 0)  # rank 0 first


def rank_started() -> None:
    """Under `--nproc`: write to the launcher's stderr and tell it this rank's pid."""
    folder = os.environ.get(LAUNCH_DIR)
    if not folder:
        return
    if os.environ.get(LAUNCHER_STDERR):
        fd = os.open(os.environ[LAUNCHER_STDERR], os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 2)
        os.close(fd)
    (Path(folder) / f"pid-{env_rank()}").write_text(str(os.getpid()))


def rank_finished(code: int) -> None:
    """Under `--nproc`: tell the launcher this rank's exit status."""
    folder = os.environ.get(LAUNCH_DIR)
    if folder:
        (Path(folder) / f"status-{env_rank()}").write_text(str(int(code)))
