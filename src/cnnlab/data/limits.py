"""How much memory this process may still take: the least of what the machine has free, its
cgroup's limit (containers, systemd units, CI runners) and its address-space limit
(`ulimit -v`). Decoding a dataset that would not fit is refused before it starts."""

from __future__ import annotations

import resource
from pathlib import Path

import psutil


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
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one hierarchy
            folder = Path("/sys/fs/cgroup") / path.lstrip("/")
            names = ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # cgroup v1
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = ((folder / n).read_text().strip() for n in names)
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
            return max(0, int(limit) - int(usage))
    return None


def size_text(size: int) -> str:
    """A number of bytes for people: GiB, or MiB below one."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
