"""The typed messages of the meter's channels.

    Scheduler --list[UsageEvent]--> Meter.record (acknowledged once durable; retried until then)

A usage event is what happened to one engine request, keyed by its id: the
ledger ignores an id it already holds, so a retry never counts twice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UsageEvent:
    request_id: str
    http_request_id: str | None
    tenant: str
    key_id: str | None
    model: str
    lora: str | None  # the LoRA adapter served (its name; None: the base model)
    replica: int | None
    gpu_type: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    status: str
    arrived_at: float
    finished_at: float
    ttft_ms: float | None
    duration_ms: float
    prefill_replica: int | None = None  # prefill/decode: the replica that computed the prompt (`replica` decoded)
