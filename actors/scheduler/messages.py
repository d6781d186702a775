"""Typed messages at the actor boundaries above the workers.

    Ingress --SubmitRequest--> Scheduler --TokenBatch (one per ingress per step)--> Ingress
    Ingress --RouteQuery--> Router --> replica index
    Scheduler --ReplicaStats--> Router (periodically, off the token path)

(Scheduler <-> Worker messages are models/step.py's StepInput/StepOutput.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ziggurat.actors.scheduler.scheduler import StepUpdates
from ziggurat.sampling_params import SamplingParams


@dataclass
class SubmitRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    ingress_id: str  # where this request's tokens go
    cache_extra_keys: tuple = ()  # (lora id, cache salt) mixed into prefix-cache hashes
    # For metering: who asked, for what, under which HTTP request.
    tenant: str = "default"
    key_id: str | None = None
    http_request_id: str | None = None
    model: str = ""
    lora: str | None = None
    # n > 1: only the first child of a prompt bills the prompt (as OpenAI does).
    bill_prompt: bool = True


@dataclass
class SubmitResult:
    ok: bool
    error: str | None = None
    # "invalid" / "context_length_exceeded" (400), "queue_full" (429), "unavailable" (503)
    code: str | None = None


@dataclass
class TokenBatch:
    """Everything one scheduler step produced for one ingress."""

    replica: int
    epoch: str  # the ingress incarnation this numbering belongs to
    seq: int  # per (replica, ingress epoch), from 0: the ingress applies batches in this order
    updates: StepUpdates = field(default_factory=StepUpdates)  # iterate for RequestUpdates


@dataclass
class ReplicaStats:
    replica: int
    num_waiting: int
    num_running: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    steps: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    step_seconds_total: float = 0.0  # in engine.step(): schedule, launch, wait for the workers, update
    busy_seconds_total: float = 0.0  # in loop iterations that ran a step (adds the inbox and sending tokens)
    # Where step time goes, summed: schedule, launch, wait (for the workers), update, publish (tokens out).
    phase_seconds: dict = field(default_factory=dict)
    # The scheduler process's garbage-collector pauses, per generation (seconds, count).
    gc_seconds: list = field(default_factory=list)
    gc_collections: list = field(default_factory=list)
    # Per tenant: requests, prompt/cached/completion tokens of finished requests
    # (the engine's own counts, for reconciliation with the ledger).
    tenant_totals: dict = field(default_factory=dict)
    unacked_usage_events: int = 0
