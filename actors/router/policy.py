"""Replica choice: prefix affinity first, least load otherwise.

The router sees each request once, before it starts (never on the token
path). Requests carry the chained hashes of their first full prompt blocks
(the same hashes the prefix cache uses); the router remembers which replica
last served each hash. A replica whose cache likely holds the longest prefix
wins unless it is much busier than the least-loaded replica. Load = queued +
running requests (from the replicas' periodic reports plus picks made since)
weighted by KV usage.

The index is fed by what the router itself routed (`observe`), so it is
approximate: it does not see evictions.

With prefill and decode pools, a prompt of at least `pd_min_prompt_tokens`
gets a pair (`route`): the prefill replica by the same prefix affinity and
load, the decode replica by load weighted by KV usage (its headroom for the
pulled blocks). Shorter prompts, or a deployment missing one of the two
pools, are served whole: by a mixed replica, else a decode one, else a
prefill one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """Where a request goes: submitted to `replica`, which computes its prompt;
    with `decode` set, that replica hands it off after the first token."""

    replica: int
    decode: int | None = None


@dataclass
class _Replica:
    healthy: bool = True
    reported_load: int = 0
    kv_usage: float = 0.0
    picked_since_report: int = 0

    @property
    def load(self) -> float:
        return (self.reported_load + self.picked_since_report) * (1.0 + self.kv_usage)


class Router:
    def __init__(self, num_replicas: int, max_index_entries: int = 100_000, affinity_slack: float = 8.0,
                 roles: list[str] | None = None, pd_min_prompt_tokens: int = 64):
        self.replicas = [_Replica() for _ in range(num_replicas)]
        self.roles = list(roles) if roles is not None else ["mixed"] * num_replicas
        self.pd_min_prompt_tokens = pd_min_prompt_tokens
        self.index: OrderedDict[bytes, int] = OrderedDict()  # block hash -> replica, LRU
        self.max_entries = max_index_entries
        self.slack = affinity_slack  # extra load tolerated to keep a prefix hit

    def healthy(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.healthy]

    def route(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0) -> Route | None:
        live = self.healthy()
        by_role = {role: [i for i in live if self.roles[i] == role] for role in ("mixed", "prefill", "decode")}
        if by_role["prefill"] and by_role["decode"] and num_prompt_tokens >= self.pd_min_prompt_tokens:
            p = self._pick(prefix_hashes, by_role["prefill"])
            d = min(by_role["decode"], key=lambda i: (self.replicas[i].load, self.replicas[i].kv_usage, i))
            self.replicas[d].picked_since_report += 1
            return Route(p, d)
        pool = by_role["mixed"] or by_role["decode"] or by_role["prefill"]
        return Route(self._pick(prefix_hashes, pool)) if pool else None

    def pick(self, prefix_hashes: list[bytes]) -> int | None:
        """A replica for the whole request (no hand-off)."""
        live = self.healthy()
        return self._pick(prefix_hashes, live) if live else None

    def _pick(self, prefix_hashes: list[bytes], live: list[int]) -> int:
        least = min(live, key=lambda i: (self.replicas[i].load, i))
        best, best_len = least, 0
        for i in live:
            n = self._match_len(prefix_hashes, i)
            if n > best_len:
                best, best_len = i, n
        if best_len and self.replicas[best].load > self.replicas[least].load + self.slack:
            best = least
        self.replicas[best].picked_since_report += 1
        self.observe(prefix_hashes, best)
        return best

    def _match_len(self, hashes: list[bytes], replica: int) -> int:
        n = 0
        for h in hashes:
            if self.index.get(h) != replica:
                break
            n += 1
        return n

    def observe(self, hashes: list[bytes], replica: int) -> None:
        for h in hashes:
            self.index[h] = replica
            self.index.move_to_end(h)
        while len(self.index) > self.max_entries:
            self.index.popitem(last=False)


    def report(self, replica: int, num_waiting: int, num_running: int, kv_usage: float) -> None:
        r = self.replicas[replica]
        r.reported_load, r.kv_usage, r.picked_since_report = num_waiting + num_running, kv_usage, 0
        r.healthy = True

    def mark_unhealthy(self, replica: int) -> None:
        self.replicas[replica].healthy = False
        for h in [h for h, rep in self.index.items() if rep == replica]:
            del self.index[h]
