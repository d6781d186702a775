"""The typed messages of the router's channels.

    Ingress --route(prefix hashes, prompt tokens, adapter)--> Router --Route--> Ingress   (one round trip a request)
    Scheduler --ReplicaStats, KVEvents--> every Router   (actors/scheduler/messages.py)
    Router --ReplicaLoad (per replica)--> launcher       (the autoscaling signal, as the router sees it)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Route:
    """Where a request goes: submitted to `replica`, which computes its prompt;
    with `decode` set, that replica hands it off after the first token."""

    replica: int
    decode: int | None = None


@dataclass
class ReplicaLoad:
    """One replica as this router sees it: its last report plus what this router
    sent it since (so several routers never count each other's picks twice).
    The fields autoscale.decide reads are named as in ReplicaStats."""

    replica: int
    role: str
    healthy: bool
    num_waiting: int  # queued requests (reported + routed here since the report)
    num_running: int
    num_waiting_tokens: int  # their prompt tokens not yet computed
    kv_usage: float
    adapters: list = field(default_factory=list)  # resident LoRA adapters (reported + routed here since)
    cached_blocks: int = 0  # prefix-cache blocks the router's index holds for it
    routed: int = 0  # requests this router sent it, in all
    num_receiving: int = 0  # decode side of prefill/decode: hand-offs waiting (reported)
    num_sending: int = 0
    reported: bool = False  # this router has a report of it (a restarted router has none until the next)
