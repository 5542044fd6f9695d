"""Several processes through torch.distributed: calibration samples split across ranks, scores
summed with all-reduce. Started by ``torchrun``; a single process needs none of this.

    torchrun --nproc-per-node 2 -m bitplan search MODEL --options mxfp4,mxfp8 --avg-bits 5
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on
    GPU. Safe to call more than once."""
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def leave() -> None:
    """Leave the process group, if joined. A process that exits with gloo's threads still
    running can abort at exit ("terminate called without an active exception"), which fails a
    torchrun that has done all its work."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(samples: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration samples (every world_size-th, from its rank)."""
    return samples[rank() :: world_size()]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks (float64 on the CPU for gloo; on the current device for
    NCCL). Identity in a single process."""
    if world_size() == 1:
        return values
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = values.to(device=device, dtype=torch.float64)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu()
