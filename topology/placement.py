"""Placement groups: a TP group's ranks on one node (STRICT_PACK), never silently spread."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def replica_bundles(tensor_parallel_size: int, use_gpu: bool, cpus_per_worker: float = 1.0,
                    gpus_per_worker: float = 1.0, resources: dict | None = None) -> list[dict]:
    """One bundle per TP rank: its CPU, its GPU (or share of one) and any custom
    resources its pool is pinned by."""
    bundle = {"CPU": cpus_per_worker, **(resources or {})}
    if use_gpu:
        bundle["GPU"] = gpus_per_worker
    return [dict(bundle) for _ in range(tensor_parallel_size)]


def create_replica_group(tensor_parallel_size: int, use_gpu: bool, timeout_s: float = 120.0, name: str = ""):
    pg = placement_group(replica_bundles(tensor_parallel_size, use_gpu), strategy="STRICT_PACK", name=name)
    ready = pg.ready()
    done, _ = ray.wait([ready], timeout=timeout_s)
    if not done:
        remove_placement_group(pg)
        need = "GPU" if use_gpu else "CPU"
        raise RuntimeError(
            f"could not place a tensor-parallel group of {tensor_parallel_size} {need} worker(s) on one node within "
            f"{timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
        )
    return pg


def bundle_strategy(pg, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)


def release(pg) -> None:
    try:
        remove_placement_group(pg)
    except Exception:
        pass
