"""One process of a torch.distributed training job: who it is in its group, and the few
collectives `fit()` needs. Launched by torchrun (pipeline/tracking/launch.py), each process holds
the whole split on its device and trains on its shard of every global batch; DistributedDataParallel
averages the gradients, so a step is the step one process would take on the whole batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    local_rank: int

    @property
    def leads(self) -> bool:
        """Rank 0: the one process that talks to MLflow."""
        return self.rank == 0


def current_worker() -> Worker | None:
    """This process's place in a torchrun job (from the variables torchrun sets), or None when it
    trains alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Worker(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def worker_device(worker: Worker, device: torch.device) -> torch.device:
    """One GPU per process (by local rank); CPU processes share the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(worker.local_rank)
        return torch.device("cuda", worker.local_rank)
    return device


def join_group(device: torch.device, timeout_s: float) -> None:
    """NCCL on CUDA, gloo on CPU; a collective that waits longer than `timeout_s` (a peer died
    without its agent noticing) fails instead of hanging."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` added up over every process (itself when training alone)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def from_leader(value: T) -> T:
    """Rank 0's `value` on every process (the run id the followers label their metrics with, the
    time budget's plan)."""
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
