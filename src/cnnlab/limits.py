"""What this process may use of the machine: CPUs (its affinity and its cgroup's CPU quota,
not every core the machine has) and memory (the least of what the machine has free, its
cgroup's limit - containers, systemd units, CI runners - and its address-space limit,
`ulimit -v`: decoding a dataset that would not fit is refused before it starts)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import psutil


def usable_cpus() -> int:
    """The CPUs this process may run on: those of its affinity, fewer where its cgroup's CPU
    quota allows less (a container given 2 CPUs of a 64-core machine), at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cpus, quota) if quota else cpus)


def default_threads() -> int:
    """The CPU threads a process trains with unless --threads says: $OMP_NUM_THREADS where it
    is set (by the user, or by cnnlab for each of its processes), else the usable CPUs less
    those other processes keep busy (at least one).

    Why: the threads of a parallel region wait for each other at its end. On a core that
    another process also wants, a thread runs half the time, and every other thread waits
    for it, spinning: on a 2-core machine beside two busy processes, 2 threads took 5-16 s
    where 1 took 5 s (quiet: 2.9 s and 3.5 s). OpenMP's passive waiting (OMP_WAIT_POLICY)
    helps less and costs a quiet machine a quarter (benchmarks/RESULTS.md)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, usable_cpus() - round(others_busy()))


def others_busy() -> float:
    """How many of this process's CPUs other processes keep busy: their CPU time over the
    time since this module was imported (this process's own, and its children's, left out),
    or over a fresh quarter of a second where that was too short or too long ago."""
    global _SINCE
    start, now = _SINCE, _cpu_sample()
    if not 0.2 <= now[0] - start[0] <= 30:
        time.sleep(0.25)
        start, now = now, _cpu_sample()
    _SINCE = now
    return max(0.0, ((now[1] - start[1]) - (now[2] - start[2])) / (now[0] - start[0]))


def _cpu_sample() -> tuple[float, float, float]:
    """(now, CPU seconds the machine's usable CPUs spent busy, this process's and its
    children's CPU seconds)."""
    try:
        mine = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = None
    per_cpu = psutil.cpu_times(percpu=True)
    busy = sum(sum(t) - t.idle - getattr(t, "iowait", 0.0)
               for i, t in enumerate(per_cpu) if mine is None or i in mine)
    own = os.times()
    return (time.monotonic(), busy,
            own.user + own.system + own.children_user + own.children_system)


_SINCE = _cpu_sample()


def _cgroup_cpus() -> int | None:
    """The CPUs this process's cgroup quota gives (cpu.max, or cpu.cfs_quota_us over
    cpu.cfs_period_us under cgroup v1), rounded up; None without a quota."""
    import math

    for folder in _cgroup_folders("cpu"):
        for quota_file, period_file in (("cpu.max", None),
                                        ("cpu.cfs_quota_us", "cpu.cfs_period_us")):
            try:
                text = (folder / quota_file).read_text().split()
                if period_file:
                    text.append((folder / period_file).read_text().strip())
            except OSError:
                continue
            quota, period = text[0], text[1] if len(text) > 1 else "100000"
            if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit():
                return max(1, math.ceil(int(quota) / int(period)))
            return None
    return None


def _cgroup_folders(controller: str) -> list[Path]:
    """This process's cgroup folders that may hold `controller`'s files (v2, then v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folders.append(Path("/sys/fs/cgroup") / path.lstrip("/"))
        elif controller in controllers.split(","):
            folders += [Path("/sys/fs/cgroup") / c / path.lstrip("/")
                        for c in (controllers, controller)]
    return folders


def memory_available() -> tuple[int, str]:
    """(bytes this process may still allocate, what sets that bound, in words)."""
    bounds = [(psutil.virtual_memory().available, "the memory available on this machine")]
    cgroup = _cgroup_room()
    if cgroup is not None:
        bounds.append((cgroup, "this process's cgroup memory limit"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = psutil.Process().memory_info().vms
        bounds.append((max(0, soft - used), "its address-space limit (ulimit -v)"))
    return min(bounds)


def _cgroup_room() -> int | None:
    """What this process's cgroup may still take (its limit less what it uses), or None
    without a limit."""
    for folder in _cgroup_folders("memory"):
        for limit_file, usage_file in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            try:
                limit = (folder / limit_file).read_text().strip()
                usage = (folder / usage_file).read_text().strip()
            except OSError:
                continue
            if limit.isdigit() and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                return max(0, int(limit) - int(usage))
            return None
    return None


def size_text(size: int) -> str:
    """A number of bytes for people: GiB, or MiB below one."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
