"""RouterActor: a thin shell around policy.Router."""

from __future__ import annotations

import ray

from ziggurat.actors.router.policy import Route, Router
from ziggurat.actors.scheduler.messages import ReplicaStats


@ray.remote(num_cpus=0)
class RouterActor:
    def __init__(self, num_replicas: int, roles: list[str] | None = None, pd_min_prompt_tokens: int = 64):
        self.router = Router(num_replicas, roles=roles, pd_min_prompt_tokens=pd_min_prompt_tokens)
        self.stats: dict[int, ReplicaStats] = {}

    def pick(self, prefix_hashes: list[bytes]) -> int | None:
        return self.router.pick(prefix_hashes)

    def route(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0) -> Route | None:
        return self.router.route(prefix_hashes, num_prompt_tokens)

    def report(self, stats: ReplicaStats) -> None:
        self.stats[stats.replica] = stats
        self.router.report(stats.replica, stats.num_waiting + stats.num_receiving, stats.num_running, stats.kv_usage)

    def pool_stats(self) -> list[ReplicaStats]:
        """The replicas' latest reports, as the router sees them (queue depth, KV usage, role)."""
        return [self.stats[r] for r in sorted(self.stats)]

    def mark_unhealthy(self, replica: int) -> None:
        self.router.mark_unhealthy(replica)

    def healthy(self) -> list[int]:
        return self.router.healthy()
