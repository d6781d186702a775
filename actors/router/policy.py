"""Replica choice: which replica (or prefill/decode pair) serves a request.

The router sees each request once, before it starts (never on the token
path): the chained hashes of its prompt's full blocks (block_pool.py's, the
ones the prefix cache looks it up by), its prompt length and its LoRA adapter.
One setting (RouterConfig.routing_policy) picks how:

    kv-aware         the exact index (kv_index.KVIndex, fed by every replica's
                     KVEvents, plus this router's own picks not yet reported)
                     gives each replica's leading cached blocks; the replica
                     with the lowest scoring.replica_cost wins (a hit's prefill
                     saving against its queue, running requests, KV room and a
                     cold adapter load)
    prefix-affinity  the earlier policy, kept for A/B: an approximate index of
                     what this router sent where; the longest match wins unless
                     that replica is `routing_affinity_slack` requests busier
    least-load       fewest queued + running requests, weighted by KV usage
    round-robin      in turn

Load is each replica's last ReplicaStats (or KV events) plus what *this*
router sent it that the message cannot count yet (picks made less than
routing_pending_s before it arrived), so several router actors (each fed the
same events and reports) never count each other's picks twice, and the index
is the same in all of them. A new prefix is placed by traffic share
(scoring.py, "Placement"). A restarted router rebuilds its index from the
replicas' snapshots: it asks for one on the first KV message it cannot place
in sequence, and on the first report of a replica whose cache it does not
mirror (an idle replica sends reports but no KV events).

With prefill and decode pools, a prompt of at least `pd_min_prompt_tokens`
gets a pair (`route`): the prefill replica by the policy above, the decode
replica by load weighted by KV usage (its headroom for the pulled blocks).
Shorter prompts, or a deployment missing one of the two pools, are served
whole: by a mixed replica, else a decode one, else a prefill one.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from ziggurat.actors.router.kv_index import AffinityIndex, KVIndex, RecentPicks, leading_matches
from ziggurat.actors.router.messages import ReplicaLoad, Route
from ziggurat.actors.router.scoring import RouterConfig, replica_cost
from ziggurat.actors.scheduler.messages import KVEvents, ReplicaStats

__all__ = ["Decision", "Route", "Router", "RouterConfig"]

TRAFFIC_DECAY = 1.0 - 1.0 / 64  # per request routed: traffic shares cover about the last 64
MAX_PENDING = 4096  # picks a replica's messages have not counted yet, kept at most (a silent replica's)


@dataclass
class _Replica:
    role: str = "mixed"
    healthy: bool = True
    # Its last report.
    num_waiting: int = 0
    num_running: int = 0
    waiting_tokens: int = 0
    kv_usage: float = 0.0
    adapters: frozenset = frozenset()
    num_receiving: int = 0
    num_sending: int = 0
    reported: bool = False  # a report (or KV events with the queue) came since this router started
    # What this router sent it that its messages may not count yet: (when, prompt tokens to
    # compute) per pick, oldest first (see settle); picks_since is their number.
    pending: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_PENDING))
    picks_since: int = 0
    # Adapters this router sent here -> when it last did: a report counts them (resident or
    # loading) only if they were sent at least routing_pending_s before it arrived, as with picks.
    adapters_since: dict = field(default_factory=dict)
    routed: int = 0
    traffic: float = 0.0  # requests routed here, decayed per request routed anywhere (TRAFFIC_DECAY)
    # Prompt tokens queued there, as a leaky bucket: the report's, plus what this router
    # sent since, drained at the prefill rate the cost assumes (a report every 0.2 s is
    # stale for requests that end sooner than that).
    queued: float = 0.0
    queued_at: float = 0.0

    def picked(self, now: float, tokens: int) -> None:
        self.pending.append((now, tokens))
        self.picks_since = len(self.pending)

    def settle(self, now: float, window: float, rate: float) -> float:
        """A message from the replica arrived now: it counts the picks made more than `window`
        before (their submit call reached the replica before the message left), not the later
        ones, which stay counted on top of it. Returns the prompt tokens of those still
        queued, drained at `rate` since their pick (as the queued_tokens bucket drains)."""
        p = self.pending
        while p and p[0][0] <= now - window:
            p.popleft()
        self.picks_since = len(p)
        return sum(max(0.0, tokens - rate * (now - t)) for t, tokens in p)

    def queued_tokens(self, now: float, rate: float) -> float:
        self.queued = max(0.0, self.queued - rate * (now - self.queued_at))
        self.queued_at = now
        return self.queued

    @property
    def requests(self) -> int:
        return self.num_waiting + self.num_receiving + self.num_running + self.picks_since

    @property
    def load(self) -> float:
        return self.requests * (1.0 + self.kv_usage)

    def resident(self, adapter: str) -> bool:
        return adapter in self.adapters or adapter in self.adapters_since


@dataclass
class Decision:
    """The last choice, for tests and counters: each candidate's leading cached
    blocks as the router believed, and the one chosen."""

    chosen: int
    matches: dict
    costs: dict

    @property
    def best_match(self) -> int:
        return max(self.matches.values(), default=0)

    @property
    def load_override(self) -> bool:
        """A replica held a longer prefix than the chosen one (load won)."""
        return self.matches.get(self.chosen, 0) < self.best_match


class Router:
    def __init__(self, num_replicas: int, roles: list[str] | None = None, pd_min_prompt_tokens: int = 64,
                 config: RouterConfig | None = None, block_size: int = 16, clock=time.monotonic):
        self.config = config or RouterConfig()
        roles = list(roles) if roles is not None else ["mixed"] * num_replicas
        self.replicas = [_Replica(role) for role in roles]
        for r in self.replicas:  # shares start even: as if the last ~64 requests had been spread evenly
            r.traffic = 1.0 / (1.0 - TRAFFIC_DECAY) / len(self.replicas)
        self.pd_min_prompt_tokens, self.block_size = pd_min_prompt_tokens, block_size
        self.kv = KVIndex(clock)
        self.recent = RecentPicks(self.config.routing_recent_ttl_s, clock=clock)
        self.affinity = AffinityIndex()
        self.clock = clock
        self._rr = 0
        self.last: Decision | None = None
        self.counters = {"picks": 0, "hit_blocks": 0, "load_overrides": 0, "adapter_cold": 0,
                         "placements_steered": 0}

    @property
    def roles(self) -> list[str]:
        return [r.role for r in self.replicas]

    def healthy(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.healthy]

    # -- choosing ------------------------------------------------------------------------

    def route(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0, adapter: str | None = None) -> Route | None:
        live = self.healthy()
        by_role = {role: [i for i in live if self.replicas[i].role == role] for role in ("mixed", "prefill", "decode")}
        if by_role["prefill"] and by_role["decode"] and num_prompt_tokens >= self.pd_min_prompt_tokens:
            p = self._pick(prefix_hashes, num_prompt_tokens, adapter, by_role["prefill"])
            d = min(by_role["decode"], key=lambda i: (self.replicas[i].load, self.replicas[i].kv_usage, i))
            self.replicas[d].picked(self.clock(), 0)
            self.replicas[d].routed += 1
            return Route(p, d)
        pool = by_role["mixed"] or by_role["decode"] or by_role["prefill"]
        return Route(self._pick(prefix_hashes, num_prompt_tokens, adapter, pool)) if pool else None

    def pick(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0, adapter: str | None = None) -> int | None:
        """A replica for the whole request (no hand-off)."""
        live = self.healthy()
        return self._pick(prefix_hashes, num_prompt_tokens, adapter, live) if live else None

    def _pick(self, hashes: list[bytes], num_tokens: int, adapter: str | None, live: list[int]) -> int:
        policy = self.config.routing_policy
        num_tokens = num_tokens or len(hashes) * self.block_size
        if policy == "round-robin":
            self._rr += 1
            choice, matches, costs = live[self._rr % len(live)], {}, {}
        elif policy == "least-load":
            choice, matches, costs = min(live, key=lambda i: (self.replicas[i].load, i)), {}, {}
        elif policy == "prefix-affinity":
            choice, matches, costs = self._affinity(hashes, live)
        else:
            choice, matches, costs = self._kv_aware(hashes, num_tokens, adapter, live)
        self._took(choice, hashes, num_tokens, adapter, matches.get(choice, 0))
        self.last = Decision(choice, matches, costs)
        self.counters["picks"] += 1
        self.counters["hit_blocks"] += matches.get(choice, 0)
        self.counters["load_overrides"] += self.last.load_override
        return choice

    def _kv_aware(self, hashes, num_tokens, adapter, live):
        kv, recent = self.kv, self.recent
        matches = leading_matches(hashes, live, lambda h: kv.mask(h) | recent.mask(h))
        costs, now, rate = {}, self.clock(), self.config.routing_prefill_tokens_per_s
        total = sum(self.replicas[i].traffic for i in live) or 1.0
        for i in live:
            r = self.replicas[i]
            hit = min(matches[i] * self.block_size, max(num_tokens - 1, 0))
            costs[i] = replica_cost(self.config, prompt_tokens=num_tokens, uncached_tokens=num_tokens - hit,
                                    traffic_share=r.traffic / total,
                                    queued_tokens=r.queued_tokens(now, rate),
                                    running=r.num_running + r.picks_since, kv_usage=r.kv_usage,
                                    cold_adapter=adapter is not None and not r.resident(adapter))
        n = len(self.replicas)
        self._rr += 1
        key = lambda i: (round(costs[i], 9), self.replicas[i].requests, (i - self._rr) % n)  # noqa: E731
        choice = free = min(live, key=key)
        eligible = self._placement(matches, num_tokens, adapter, live, total)
        if len(eligible) < len(live):
            choice = min(eligible, key=key)
            if costs[choice] - costs[free] > self.config.routing_placement_slack_s:
                choice = free  # the light replicas' queues cost this request too much: load wins
            self.counters["placements_steered"] += choice != free
        if adapter is not None and not self.replicas[choice].resident(adapter):
            self.counters["adapter_cold"] += 1
        return choice, matches, costs

    def _placement(self, matches: dict, num_tokens: int, adapter, live: list[int], total: float) -> list[int]:
        """The replicas a new prefix (no replica holds half the prompt) should go to: it
        settles where it lands and its followers go there, so only replicas at most
        routing_placement_share x the even share of recent traffic (never none: one is at
        or below the mean), and of those, with an adapter, where it is resident (a cold
        load is the cost's to weigh). Any other request, or none such: every live replica."""
        share = self.config.routing_placement_share
        best = max(matches.values(), default=0)
        if not share or 2 * best * self.block_size >= num_tokens:
            return live
        cap = share * total / len(live) + 1e-9
        light = [i for i in live if self.replicas[i].traffic <= cap
                 and (adapter is None or self.replicas[i].resident(adapter))]
        return light or live

    def _affinity(self, hashes, live):
        matches = leading_matches(hashes, live, self.affinity.mask)
        least = min(live, key=lambda i: (self.replicas[i].load, i))
        best = max(live, key=lambda i: (matches[i], -i))
        if not matches[best] or self.replicas[best].load > self.replicas[least].load + self.config.routing_affinity_slack:
            best = least
        return best, matches, {}

    def _took(self, i: int, hashes, num_tokens: int, adapter, hit_blocks: int) -> None:
        for x in self.replicas:
            x.traffic *= TRAFFIC_DECAY
        r = self.replicas[i]
        r.traffic += 1.0
        r.routed += 1
        now, tokens = self.clock(), max(num_tokens - hit_blocks * self.block_size, 1)
        r.picked(now, tokens)
        r.queued_tokens(now, self.config.routing_prefill_tokens_per_s)
        r.queued += tokens
        if adapter is not None:
            r.adapters_since[adapter] = now
        if self.config.routing_policy == "prefix-affinity":
            self.affinity.observe(hashes, i)
        else:
            self.recent.add(hashes, i)

    # -- what replicas tell us -------------------------------------------------------------

    def report(self, stats: ReplicaStats) -> bool:
        """Apply a replica's report; True: it should send a KV snapshot (this router does
        not mirror its cache yet: new, restarted, or a gap not mended)."""
        r = self.replicas[stats.replica]
        r.num_waiting = stats.num_waiting
        r.num_running, r.kv_usage = stats.num_running, stats.kv_usage
        r.waiting_tokens = stats.num_waiting_tokens
        now = self.clock()
        unseen = r.settle(now, self.config.routing_pending_s, self.config.routing_prefill_tokens_per_s)
        r.queued, r.queued_at = stats.num_waiting_tokens + unseen, now
        r.adapters = frozenset(stats.adapters)
        r.num_receiving, r.num_sending = stats.num_receiving, stats.num_sending
        r.role = stats.role or r.role
        cutoff = now - self.config.routing_pending_s
        r.adapters_since = {a: t for a, t in r.adapters_since.items() if t > cutoff}
        r.healthy = r.reported = True
        return self.kv.wants_snapshot(stats.replica)

    def kv_events(self, ev: KVEvents) -> bool:
        """Apply a replica's KV events and the queue they came with; True: it should send a snapshot."""
        if ev.removed:
            self.recent.evicted(ev.replica, ev.removed)
        r = self.replicas[ev.replica]
        r.num_waiting, r.num_running, r.kv_usage = ev.num_waiting, ev.num_running, ev.kv_usage
        now = self.clock()
        unseen = r.settle(now, self.config.routing_pending_s, self.config.routing_prefill_tokens_per_s)
        if not ev.num_waiting:  # nothing waited there as it left: only the picks it cannot count are queued
            r.queued, r.queued_at = unseen, now
        return self.kv.apply(ev)

    def mark_unhealthy(self, replica: int) -> None:
        self.replicas[replica].healthy = self.replicas[replica].reported = False
        self.replicas[replica].pending.clear()
        self.replicas[replica].picks_since = 0
        self.affinity.forget(replica)
        self.recent.forget(replica)

    # -- the autoscaling signal ------------------------------------------------------------

    def load_signal(self) -> list[ReplicaLoad]:
        """Per replica: queue depth, KV usage and resident adapters as this router sees them
        (cluster/supervisor.py's autoscaling reads it, one call a decision)."""
        rate = self.config.routing_prefill_tokens_per_s
        return [ReplicaLoad(i, r.role, r.healthy, r.num_waiting + r.picks_since, r.num_running,
                            int(r.queued_tokens(self.clock(), rate)), r.kv_usage, sorted(r.adapters | set(r.adapters_since)),
                            self.kv.num_blocks(i), r.routed, r.num_receiving, r.num_sending, r.reported)
                for i, r in enumerate(self.replicas)]
