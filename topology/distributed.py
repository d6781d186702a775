"""Tensor-parallel process group: who am I, how many of us, and the collectives.

One process = one TP rank. The group is process-wide state (like the CUDA
device), so layers read rank and size at construction; per-step state is
never global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None  # torch ProcessGroup, None for tp=1


_TP = TPGroup()


def tp() -> TPGroup:
    return _TP


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str | None = None) -> TPGroup:
    """Join (or create) the TP group. backend: 'nccl' on GPU, 'gloo' on CPU."""
    global _TP
    if world_size == 1:
        _TP = TPGroup()
        return _TP
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    _TP = TPGroup(rank=rank, size=world_size, group=dist.group.WORLD)
    return _TP


def destroy_tensor_parallel() -> None:
    global _TP
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP = TPGroup()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size > 1:
        dist.all_reduce(x, group=_TP.group)
    return x


def gather_last_dim_to_first_rank(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate each rank's shard of the last dim on rank 0; others get None."""
    if _TP.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_TP.size)] if _TP.rank == 0 else None
    dist.gather(x, parts, dst=0, group=_TP.group)
    return torch.cat(parts, dim=-1) if _TP.rank == 0 else None


def shard_range(total: int, rank: int, size: int, what: str = "dimension") -> tuple[int, int]:
    if total % size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({size})")
    n = total // size
    return rank * n, n
