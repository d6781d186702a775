"""RouterActor: a thin shell around policy.Router.

A deployment may run several (`routers`); every scheduler sends its
ReplicaStats and KVEvents to all of them, so their indexes agree, and each
ingress asks one of them per request (one round trip). One thread: routes,
reports and events are applied in the order they arrive.
"""

from __future__ import annotations

import ray

from ziggurat.actors.router.messages import ReplicaLoad, Route
from ziggurat.actors.router.policy import Router
from ziggurat.actors.router.scoring import RouterConfig
from ziggurat.actors.scheduler.messages import KVEvents, ReplicaStats


@ray.remote(num_cpus=0)
class RouterActor:
    def __init__(self, num_replicas: int, roles: list[str] | None = None, pd_min_prompt_tokens: int = 64,
                 config: RouterConfig | None = None, block_size: int = 16):
        self.router = Router(num_replicas, roles=roles, pd_min_prompt_tokens=pd_min_prompt_tokens, config=config,
                             block_size=block_size)
        self.stats: dict[int, ReplicaStats] = {}

    def pick(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0, adapter: str | None = None) -> int | None:
        return self.router.pick(prefix_hashes, num_prompt_tokens, adapter)

    def route(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0, adapter: str | None = None) -> Route | None:
        return self.router.route(prefix_hashes, num_prompt_tokens, adapter)

    def report(self, stats: ReplicaStats) -> bool:
        """A replica's stats. True: it should send a KV snapshot (this router does not
        mirror its cache: it is new or restarted and the replica idle, or a gap)."""
        self.stats[stats.replica] = stats
        return self.router.report(stats)

    def kv_events(self, events: list[KVEvents]) -> bool:
        """One replica's KVEvents, in order. True: it should send a snapshot next (a gap,
        or this router is new to it)."""
        want = False
        for ev in events:
            want |= self.router.kv_events(ev)
        return want

    def pool_stats(self) -> list[ReplicaStats]:
        """The replicas' latest reports, as the router sees them (queue depth, KV usage, role)."""
        return [self.stats[r] for r in sorted(self.stats)]

    def load_signal(self) -> list[ReplicaLoad]:
        """The autoscaling signal: per replica, queue depth, KV usage and resident adapters
        as this router sees them (its last report plus this router's picks since)."""
        return self.router.load_signal()

    def routing_stats(self) -> dict:
        """Counters (picks, estimated hit blocks, load overrides, cold adapter loads), the
        policy, and the index's state (blocks per replica, gaps, snapshots)."""
        r = self.router
        return {"policy": r.config.routing_policy, **r.counters, "gaps": r.kv.gaps, "snapshots": r.kv.snapshots,
                "routed": [x.routed for x in r.replicas],
                "cached_blocks": [r.kv.num_blocks(i) for i in range(len(r.replicas))]}

    def mark_unhealthy(self, replica: int) -> None:
        self.router.mark_unhealthy(replica)

    def healthy(self) -> list[int]:
        return self.router.healthy()
