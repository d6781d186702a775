"""Autoscaling: how many replicas each pool should have, from what its replicas report.

A pool with max_replicas > min_replicas scales (PoolSpec). Its replica slots are
fixed at deployment (max_replicas of them, named like any replica); a slot is
built to scale up and torn down to scale down, so routing, ingresses and
metering treat a scaled replica like a rebuilt one. The signal is the serving
work itself, never CPU:

    up    mean queued requests per serving replica > scale_up_queue, or mean KV usage
          > scale_up_kv, for scale_up_delay_s; or requests waiting on a pool with no
          replica at all (a cold start: at once)
    down  a replica with nothing running or queued for scale_down_idle_s (the last one
          too, down to min_replicas, which may be 0)

`stats` are the router's view, RouterActor.load_signal() (router/messages.py
ReplicaLoad: each replica's last report plus that router's picks since, and
its resident adapters; one round trip a decision, `router_view`), or the
replicas' own ReplicaStats where no router answers; `decide` reads both by the
same names. The router's view counts requests routed but not yet queued at
the replica (so a burst reads as pressure before the replicas report it);
resident adapters choose which idle replica goes: the one whose adapters
other replicas also hold, so that scaling down strands no adapter's only home.

One step at a time per pool (a replica starting blocks the next scale-up). The
supervisor (cluster/supervisor.py) acts on `decide` and asks the Ray autoscaler
for the nodes its replicas need (ray.autoscaler.sdk.request_resources).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AutoscalingConfig:
    scale_up_queue: float = _opt(4.0, "autoscaling: queued requests per replica above which a pool grows")
    scale_up_kv: float = _opt(0.9, "autoscaling: KV usage above which a pool grows")
    scale_up_delay_s: float = _opt(2.0, "autoscaling: how long the pressure must last before a pool grows")
    scale_down_idle_s: float = _opt(60.0, "autoscaling: an idle replica is removed after this long")
    cold_start_timeout_s: float = _opt(180.0, "autoscaling: how long a request waits for a pool scaled to zero")


@dataclass
class PoolState:
    """What the policy keeps per pool between decisions."""

    pressure_since: float | None = None
    idle_since: dict = field(default_factory=dict)  # replica -> since when it had no work


def decide(cfg: AutoscalingConfig, state: PoolState, now: float, stats: list, starting: int, size: int,
           min_replicas: int, max_replicas: int, demand: bool) -> tuple[str, int | None]:
    """("up", None), ("down", replica) or ("hold", None).

    stats: ReplicaStats of the pool's serving replicas; starting: replicas being built;
    size: serving + starting; demand: requests wait for this pool and it serves none."""
    if starting:
        state.pressure_since = None
        return "hold", None
    if size < min_replicas:
        return "up", None
    if size == 0:
        return ("up", None) if demand and max_replicas > 0 else ("hold", None)
    n = len(stats)
    queued = sum(s.num_waiting + getattr(s, "num_receiving", 0) for s in stats) / max(n, 1)
    kv = sum(s.kv_usage for s in stats) / max(n, 1)
    pressed = n > 0 and (queued > cfg.scale_up_queue or kv > cfg.scale_up_kv)
    if pressed:  # under pressure nothing counts as idle
        state.idle_since.clear()
        if size >= max_replicas:
            return "hold", None
        if state.pressure_since is None:
            state.pressure_since = now
        if now - state.pressure_since >= cfg.scale_up_delay_s:
            state.pressure_since = None
            return "up", None
        return "hold", None
    state.pressure_since = None
    for s in stats:
        busy = s.num_running or s.num_waiting or getattr(s, "num_receiving", 0) or getattr(s, "num_sending", 0)
        if busy:
            state.idle_since.pop(s.replica, None)
        else:
            state.idle_since.setdefault(s.replica, now)
    live = {s.replica for s in stats}
    for r in list(state.idle_since):
        if r not in live:
            del state.idle_since[r]
    if size > min_replicas:
        idle = [r for r, t in state.idle_since.items() if now - t >= cfg.scale_down_idle_s]
        if idle:
            only = _sole_holders(stats)
            # The fewest adapters held nowhere else, then the highest slot: slots fill from the bottom.
            r = max(idle, key=lambda r: (-only.get(r, 0), r))
            del state.idle_since[r]
            return "down", r
    return "hold", None


def _sole_holders(stats) -> dict:
    """replica -> how many of its resident adapters no other replica of the pool holds."""
    held: dict[str, int] = {}
    for s in stats:
        for a in getattr(s, "adapters", ()):
            held[a] = held.get(a, 0) + 1
    return {s.replica: sum(held[a] == 1 for a in getattr(s, "adapters", ())) for s in stats}


def router_view(loads: list | None, serving: list[int]) -> tuple[list, list[int]]:
    """The router's ReplicaLoad of each serving replica, and the serving replicas it
    cannot speak for (no answer, or no report of them since it started: ask those
    replicas themselves)."""
    by = {x.replica: x for x in loads or ()}
    have = [by[r] for r in serving if r in by and by[r].reported]
    return have, [r for r in serving if r not in by or not by[r].reported]
