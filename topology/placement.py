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


def check_fits(nodes: list[dict], bundles: list[dict], what: str) -> str | None:
    """Why no alive node can ever hold `bundles` together (STRICT_PACK), or None if one can.
    nodes: ray.nodes() entries (Alive, Resources: the node's totals). Checked before
    waiting on a placement group, so a deployment the cluster cannot hold fails at
    once, naming what is missing, instead of after the placement timeout."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    best_short = None
    for n in alive:
        have = n.get("Resources", {})
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
        if not short:
            gpus = need.get("GPU", 0)
            island = have.get("ziggurat_nvlink_island")
            if gpus > 1 and island is not None and island < len(bundles):
                # It fits, across NVLink islands (PCIe between them): allowed, but said.
                import logging

                logging.getLogger("ziggurat.placement").warning(
                    "%s: its %d ranks span NVLink islands of %d GPUs on node %s", what, len(bundles), int(island),
                    n.get("NodeManagerAddress", "?"))
            return None
        if best_short is None or len(short) < len(best_short):
            best_short = short
    if not alive:
        return f"{what}: the Ray cluster has no alive node"
    missing = ", ".join(f"{k} {v:g} (the closest node has {h:g})" for k, (v, h) in sorted(best_short.items()))
    return (f"{what}: no node can hold its {len(bundles)} worker(s) together: it needs {_fmt(need)} on one node; "
            f"missing {missing}. Nodes: " + "; ".join(
                f"{n.get('NodeManagerAddress', '?')} {_fmt(n.get('Resources', {}))}" for n in alive[:8]))


def _fmt(res: dict) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith(("node:", "accelerator_type", "memory",
                                                              "object_store_memory"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
