"""RouterActor: a thin shell around policy.Router."""

from __future__ import annotations

import ray

from ziggurat.actors.router.policy import Router
from ziggurat.actors.scheduler.messages import ReplicaStats


@ray.remote(num_cpus=0)
class RouterActor:
    def __init__(self, num_replicas: int):
        self.router = Router(num_replicas)
        self.stats: dict[int, ReplicaStats] = {}

    def pick(self, prefix_hashes: list[bytes]) -> int | None:
        return self.router.pick(prefix_hashes)

    def report(self, stats: ReplicaStats) -> None:
        self.stats[stats.replica] = stats
        self.router.report(stats.replica, stats.num_waiting, stats.num_running, stats.kv_usage)

    def mark_unhealthy(self, replica: int) -> None:
        self.router.mark_unhealthy(replica)

    def healthy(self) -> list[int]:
        return self.router.healthy()
