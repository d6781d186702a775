"""The router's settings and the kv-aware cost of sending a request to a replica.

The cost is an estimate, in seconds, of what the request waits for before its
first token on that replica, plus what it costs the replica to take it:

    cost(r) = (uncached_r + queued_tokens_r) / prefill_tokens_per_s     prefill: ours and the queue ahead
            + running_r * routing_running_s                            each running request's share of steps
            + routing_kv_full_s * max(0, kv_usage_r - kv_high) / (1 - kv_high)   no room: waits, evicts hits
            + routing_adapter_load_s   if the request's adapter is not resident on r (a cold load)
            + routing_balance_s * share_r * (1/4 + 3/4 * uncached_r / prompt tokens)   where prefixes settle

    share_r = replica r's share of the last ~64 requests routed

The last term places *new* prefixes where traffic is light (three quarters
of it scale with the part of the prompt that is new there): prefixes stick
where they are first computed, so the replica a miss lands on takes that
prefix's future requests too; balancing the misses by recent traffic
balances the prefixes' homes, not just this instant's queues. The quarter
that applies to hits too lets a replica far above its share shed requests
whose hit is small (a chat's first turns) before it sheds big ones. On the
issue-15 workload (scripts/bench_routing.py) this term took the busiest
replica from up to 1.9x the least busy's requests to at most 1.34x, at
96.7-102.6% of the oracle's hit rate and 0-2 conversation moves a run.

    uncached_r = prompt tokens - the leading prompt blocks replica r caches (x block size)

Placement (policy.Router._placement). A request no replica holds half of is a
new prefix: where it lands, its followers go. It goes to the cheapest replica
whose share of the last ~64 requests is at most routing_placement_share x the
even share (one always is), unless that costs it more than
routing_placement_slack_s over the cheapest replica anywhere (then load wins).
The cost alone placed new prefixes by this instant's queues, which drain within
a step and say little about the traffic a new home attracts: over HTTP on
this CPU (40 ms steps) homes piled onto whichever replica happened to be idle
when a miss came (2.0x the least busy's requests). By share, a miss is placed
by router-side counts, the same however late the replicas' messages are.

Load (policy._Replica). A replica's report or KV events count only the
requests routed there at least routing_pending_s before they arrive (the
submit call and the message's own trip); this router's later picks stay
counted on top. Resetting them on every message (KV events come every 10 ms)
made a replica just sent a request look idle again on a message that left
before the request reached it, so it took the next one too (herding).

A cache hit saves exactly its tokens' prefill; a queue costs its tokens'
prefill: both are measured in the same unit, so a hit is worth keeping only
while it saves more than the extra queue costs. Two consequences:

  * a miss everywhere goes to the least-loaded replica (the uncached term is
    equal), never to whichever replica holds the least (SGLang's "death
    spiral", where misses pile onto the smallest tree whatever its load);
  * a short shared prefix (a 3-block system prompt: 48 tokens, ~2 ms at the
    default rate) never outweighs a queue (one queued 600-token prompt:
    ~30 ms), so chats sharing it spread by load, while a conversation's own
    history (hundreds of tokens) keeps it on its replica unless that replica's
    queue grows longer than the history.

Ties (equal cost) go to the replica with fewer requests, then rotate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("kv-aware", "prefix-affinity", "least-load", "round-robin")
BALANCE_FLOOR = 0.25  # the part of the balance term that applies to a full hit too


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RouterConfig:
    routing_policy: str = _opt("kv-aware", "router: kv-aware (exact prefix index from KV events, against load), "
                                           "prefix-affinity (approximate, what it routed itself), least-load, "
                                           "round-robin")
    routing_prefill_tokens_per_s: float = _opt(20000.0, "router cost: prompt tokens a replica prefills per second "
                                                        "(a hit saves its tokens' share, a queue costs its tokens')")
    routing_running_s: float = _opt(0.002, "router cost: seconds each running request adds to a new request's wait")
    routing_adapter_load_s: float = _opt(0.05, "router cost: seconds a LoRA adapter takes to load where it is "
                                               "not resident")
    routing_kv_high: float = _opt(0.9, "router cost: KV usage above which a replica counts as short of room")
    routing_kv_full_s: float = _opt(0.05, "router cost: seconds added at full KV usage (scaled from kv_high)")
    routing_balance_s: float = _opt(0.05, "router cost: seconds added, at a full miss, per unit of a replica's share "
                                          "of recent requests (new prefixes go where traffic is light)")
    routing_placement_share: float = _opt(1.0, "router (kv-aware): a new prefix (no replica holds half the "
                                               "prompt) goes only to replicas whose share of the last ~64 requests "
                                               "is at most this multiple of the even share; 0: any replica")
    routing_placement_slack_s: float = _opt(0.05, "router (kv-aware): ... unless that costs the request more than "
                                                  "this many seconds over the cheapest replica (load wins)")
    routing_recent_ttl_s: float = _opt(2.0, "router: a prefix just routed counts as cached there for this long "
                                            "(until its KV events arrive); 0: only KV events")
    routing_pending_s: float = _opt(0.05, "router: a replica's report or KV events count only the requests "
                                          "routed there this long before they arrive (the submit call and the "
                                          "message's own trip); later ones are counted on top")
    routing_affinity_slack: float = _opt(8.0, "prefix-affinity policy: extra load tolerated to keep a prefix hit")

    def __post_init__(self) -> None:
        if self.routing_policy not in POLICIES:
            raise ValueError(f"routing_policy: must be one of {', '.join(POLICIES)}, got {self.routing_policy!r}")
        if not self.routing_prefill_tokens_per_s > 0:
            raise ValueError(f"routing_prefill_tokens_per_s: must be positive, got {self.routing_prefill_tokens_per_s}")
        for name in ("routing_running_s", "routing_adapter_load_s", "routing_kv_full_s", "routing_balance_s",
                     "routing_recent_ttl_s", "routing_pending_s", "routing_placement_slack_s",
                     "routing_affinity_slack"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be non-negative, got {getattr(self, name)}")
        if self.routing_placement_share and self.routing_placement_share < 1:
            raise ValueError(f"routing_placement_share: must be 0 (off) or at least 1, got "
                             f"{self.routing_placement_share}")
        if not 0 <= self.routing_kv_high < 1:
            raise ValueError(f"routing_kv_high: must be in [0, 1), got {self.routing_kv_high}")


def replica_cost(cfg: RouterConfig, *, prompt_tokens: int, uncached_tokens: int, queued_tokens: float, running: int,
                 kv_usage: float, cold_adapter: bool, traffic_share: float = 0.0) -> float:
    """The estimate above, in seconds (lower is better)."""
    cost = (uncached_tokens + queued_tokens) / cfg.routing_prefill_tokens_per_s + running * cfg.routing_running_s
    placed = BALANCE_FLOOR + (1.0 - BALANCE_FLOOR) * uncached_tokens / max(prompt_tokens, 1)
    cost += cfg.routing_balance_s * traffic_share * placed
    if kv_usage > cfg.routing_kv_high:
        cost += cfg.routing_kv_full_s * (kv_usage - cfg.routing_kv_high) / (1.0 - cfg.routing_kv_high)
    if cold_adapter:
        cost += cfg.routing_adapter_load_s
    return cost
