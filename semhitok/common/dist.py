"""torch.distributed helpers that degrade to single-process no-ops."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a one-machine rendezvous (other jobs here may run torchrun too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(always: bool = False) -> DistInfo:
    """Join the process group torchrun (or srun with the same env) describes. A process started alone gets none,
    or with `always` a one-process group on a free local port (DeepSpeed and Megatron-Core always want one)."""
    if always and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not always:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In place over every rank, or over `group` (a process group); one process: unchanged."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world*n, ...] (equal n on every rank)."""
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    if is_dist():
        dist.barrier()


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
