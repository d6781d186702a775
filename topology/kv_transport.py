"""How KV blocks travel between two workers, chosen by where the two are.

    same process                  -> "local"  (tests: two engines in one process)
    same host, CUDA, peer visible -> "ipc"    (the destination maps the source's cache tensors
                                               through CUDA IPC once, then copies device to device)
    otherwise                     -> "group"  (a two-rank torch.distributed group per pair of
                                               ranks: NCCL between GPUs, gloo on CPU; the same
                                               calls ride InfiniBand across hosts)

This module knows processes, devices and process groups, not models: the
block layout and the pull protocol are models/kv_transfer.py's.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Location:
    """Where a worker runs: enough to choose a transport."""

    host: str  # the node's IP address
    pid: int
    device: str  # "cpu" or "cuda"
    gpu_uuid: str = ""  # the physical GPU, for CUDA
    visible_gpus: tuple[str, ...] = ()  # UUIDs of the GPUs this process can address, by local index


def here(device: torch.device, host: str | None = None) -> Location:
    if device.type != "cuda":
        return Location(host or _host_ip(), os.getpid(), "cpu")
    uuids = tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))
    return Location(host or _host_ip(), os.getpid(), "cuda", uuids[device.index or 0], uuids)


def choose(src: Location, dst: Location) -> str:
    """The backend a destination at `dst` uses to pull from a source at `src`."""
    if src.host == dst.host and src.pid == dst.pid:
        return "local"
    if src.device == dst.device == "cuda" and src.host == dst.host and src.gpu_uuid in dst.visible_gpus:
        return "ipc"
    return "group"


def _host_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return "127.0.0.1"


# -- CUDA IPC ------------------------------------------------------------------------------

def export_ipc(tensors: list[torch.Tensor]) -> list[tuple]:
    """Picklable handles of CUDA tensors another process on this host can map (open_ipc).
    The tensors must stay alive as long as any peer may use them."""
    from torch.multiprocessing.reductions import reduce_tensor

    return [reduce_tensor(t)[1] for t in tensors]


def open_ipc(handles: list[tuple], src: Location, dst: Location) -> list[torch.Tensor]:
    """Map a peer's exported tensors into this process, on the local index of its GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    local = dst.visible_gpus.index(src.gpu_uuid)
    out = []
    for args in handles:
        args = list(args)
        args[6] = local  # storage_device: the exporter's index may name another GPU here
        out.append(rebuild_cuda_tensor(*args))
    return out


# -- pair groups ---------------------------------------------------------------------------

class PairStore:
    """A source worker's rendezvous server: every pair group it joins meets here."""

    def __init__(self, host: str, timeout_s: float):
        self.host = host
        with socket.socket() as s:
            s.bind(("", 0))
            self.port = s.getsockname()[1]
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, self.port, is_master=True, timeout=self.timeout, wait_for_workers=False,
                                   use_libuv=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def pair_group(address: tuple[str, int], pair_id: str, rank: int, backend: str, timeout_s: float,
               store=None):
    """Join the two-rank group `pair_id` (rank 0: the source, 1: the destination).
    Blocks until the other side joins (or timeout_s)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(address[0], address[1], is_master=False, timeout=timeout, use_libuv=True)
    prefix = dist.PrefixStore(f"kv-pair/{pair_id}", store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        return dist.ProcessGroupNCCL(prefix, rank, 2, opts)
    return dist.ProcessGroupGloo(prefix, rank, 2, timeout)


def group_backend(device: str) -> str:
    """NCCL between GPUs, gloo otherwise; ZIGGURAT_KV_GROUP_BACKEND=gloo forces gloo
    (staged through host memory: for a GPU pair NCCL cannot form, e.g. one GPU shared)."""
    forced = os.environ.get("ZIGGURAT_KV_GROUP_BACKEND")
    if forced:
        return forced
    return "nccl" if device == "cuda" else "gloo"


class Once:
    """A lock per key, created on first use (one pairing per peer at a time)."""

    def __init__(self) -> None:
        self._locks: dict = {}
        self._guard = threading.Lock()

    def __call__(self, key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())
