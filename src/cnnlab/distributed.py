"""Many processes with torchrun: the environment it sets switches distributed mode on, so
one command runs on one process or many. Rank 0 does all file I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import CnnlabError
from .rank import env_rank


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce_sum(t) / self.world_size if self.enabled else t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (a collective: call it on all ranks)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU) and pin this
    rank to its GPU. Without torchrun's variables: one process, `device` unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return Dist(), device
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise CnnlabError(f"rank {rank} wants cuda:{local} but this machine has "
                              f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(os.environ.get("CNNLAB_DIST_TIMEOUT", "300")))
    if device.type != "cuda":
        _gloo_interface(world)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Dist(rank, world, local), device


def _gloo_interface(world: int) -> None:
    """Across machines, gloo binds to the address this machine's hostname resolves to, often
    a loopback one that the others cannot reach (127.0.1.1 in Debian's /etc/hosts): bind it
    to the interface that reaches rank 0 (MASTER_ADDR) instead, unless GLOO_SOCKET_IFNAME
    names one. One machine's ranks are left as they are."""
    if (os.environ.get("GLOO_SOCKET_IFNAME")
            or int(os.environ.get("LOCAL_WORLD_SIZE", world)) >= world):
        return
    import socket

    import psutil

    try:
        family, kind, _, _, where = socket.getaddrinfo(
            os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500")),
            type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind) as s:
            s.connect(where)  # UDP: no packet is sent, the route is chosen
            ours = s.getsockname()[0]
    except (KeyError, ValueError, OSError):
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ours for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
