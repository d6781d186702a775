"""The typed messages of the scheduler's channels (every type that crosses its actor boundary).

    Ingress --SubmitRequest--> Scheduler --SubmitResult--> Ingress
    Scheduler --TokenBatch (one per ingress per step, StepUpdates inside)--> Ingress
    Scheduler --ReplicaStats--> Router (periodically, off the token path)
    Scheduler --KVEvents--> every Router (prefix-cache blocks stored/evicted and the queue, coalesced per step;
                                          a snapshot on request)
    Scheduler --ReplicaInfo--> launcher and ingress (once, at start-up)

The scheduler <-> worker channel is models/step.py (StepInput/StepOutput): it
belongs to the worker layer, below this one. The scheduler -> meter channel
is actors/meter/messages.py (UsageEvent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ziggurat.models.step import Logprobs
from ziggurat.sampling_params import SamplingParams

# -- Scheduler -> Ingress: what each step did --------------------------------------------


UNKNOWN = -1  # a count the sender does not know (an ingress's own failure update): keep the last one


@dataclass(slots=True)
class RequestUpdate:
    """What one step did to one request, for the front end."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs]
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int


@dataclass(slots=True)
class StepUpdates:
    """One step's RequestUpdates as columns: cheap to build for a whole batch,
    to split per ingress and to pickle. Iterating yields RequestUpdate objects
    (built by whoever reads them, not by the scheduler's step)."""

    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # -1: no new token (an error/abort update)
    num_prompt_tokens: list[int] = field(default_factory=list)
    num_cached_tokens: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)
    finished: dict[str, tuple[str, int | str | None]] = field(default_factory=dict)  # id -> (reason, stop_reason)
    logprobs: dict[str, Logprobs] = field(default_factory=dict)
    # Prefill side: requests whose first token is in this step and whose KV now
    # goes to their decode replica (the scheduler's own use; not sent to ingresses).
    handoffs: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.request_ids)

    def __iter__(self):
        fin, lps = self.finished, self.logprobs
        for rid, t, p, c, o in zip(self.request_ids, self.token_ids, self.num_prompt_tokens, self.num_cached_tokens,
                                   self.num_output_tokens):
            f = fin.get(rid)
            lp = lps.get(rid) if lps else None
            yield RequestUpdate(rid, [t] if t >= 0 else [], [lp] if lp is not None else [],
                                f[0] if f else None, f[1] if f else None, p, c, o)

    def append(self, u: RequestUpdate) -> None:
        if len(u.new_token_ids) > 1:
            raise ValueError("a step update carries at most one token")
        self.request_ids.append(u.request_id)
        self.token_ids.append(u.new_token_ids[0] if u.new_token_ids else -1)
        self.num_prompt_tokens.append(u.num_prompt_tokens)
        self.num_cached_tokens.append(u.num_cached_tokens)
        self.num_output_tokens.append(u.num_output_tokens)
        if u.finish_reason is not None:
            self.finished[u.request_id] = (u.finish_reason, u.stop_reason)
        if u.new_logprobs:
            self.logprobs[u.request_id] = u.new_logprobs[0]

    def take(self, idx: list[int]) -> "StepUpdates":
        """The entries at `idx` (in that order)."""
        ids = [self.request_ids[i] for i in idx]
        return StepUpdates(ids, [self.token_ids[i] for i in idx], [self.num_prompt_tokens[i] for i in idx],
                           [self.num_cached_tokens[i] for i in idx], [self.num_output_tokens[i] for i in idx],
                           {r: self.finished[r] for r in ids if r in self.finished} if self.finished else {},
                           {r: self.logprobs[r] for r in ids if r in self.logprobs} if self.logprobs else {})


# -- Ingress -> Scheduler ---------------------------------------------------------------


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
    prompt_param: str = "prompt"  # the request field the prompt came from ("messages" for chat), for errors
    # Prefill/decode: the decode replica this request goes on on after its first
    # token (the replica it is submitted to computes the prompt). None: all here.
    decode_replica: int | None = None
    trace: dict | None = None  # the ingress span's W3C trace context (actors/tracing.py), when tracing is on


@dataclass
class SubmitResult:
    ok: bool
    error: str | None = None
    # "invalid" / "context_length_exceeded" (400), "queue_full" (429), "unavailable" (503), "internal" (500)
    code: str | None = None
    param: str | None = None  # the request field at fault (validation.py)


@dataclass
class TokenBatch:
    """Everything one scheduler step produced for one ingress."""

    replica: int
    epoch: str  # the ingress incarnation this numbering belongs to
    seq: int  # per (replica, ingress epoch), from 0: the ingress applies batches in this order
    updates: StepUpdates = field(default_factory=StepUpdates)  # iterate for RequestUpdates
    source: str = ""  # the scheduler incarnation that numbered it (a rebuilt replica numbers afresh)
    sent_at: float = 0.0  # wall clock when the scheduler published it (the ingress's delivery histogram)


# -- Scheduler -> Scheduler (prefill -> decode) ---------------------------------------------


@dataclass
class Handoff:
    """A prefill replica's request, first token sampled, for its decode replica to
    go on with: the decode side allocates blocks, pulls the prompt's KV from
    `sources` (the prefill ranks) and answers release_handoff when done."""

    submit: SubmitRequest  # as the ingress sent it (tenant, ingress, params, decode_replica)
    prefill_replica: int
    prefill_incarnation: str
    first_token: int
    first_logprobs: Logprobs | None
    num_cached_tokens: int  # the prefill side's prefix hit: reported once, in the decode side's usage event
    src_block_ids: list[int]  # the prompt's blocks on the prefill replica, in order
    sources: list  # KVEndpoint per prefill rank (models/step.py)
    first_token_at: float  # wall clock (time to first token, for metering)
    arrived_at: float  # wall clock, when the prefill replica took it
    scheduled_at: float | None = None  # wall clock, first admitted there


@dataclass(frozen=True)
class HandoffResult:
    ok: bool
    reason: str = ""  # why not: "aborted:<reason>" (the client went first), "unavailable", "error"


# -- Scheduler -> Router, launcher, ingress ------------------------------------------------


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica turned out to be once its workers started."""

    replica: int
    model: str  # the model directory it serves (its tokenizer too)
    max_model_len: int  # the configured length, capped by the KV cache (a lone request must fit)
    vocab_size: int
    block_size: int
    num_blocks: int
    placement: list | None = None  # per rank: node, GPU ids
    incarnation: str = ""  # this scheduler's run (a rebuilt replica has a new one)
    role: str = "mixed"  # its pool: mixed | prefill | decode
    max_lora_rank: int = 0  # LoRA: the largest adapter rank it serves (0: it serves no adapters)


@dataclass(frozen=True)
class Registration:
    """A scheduler's answer to an ingress's register_ingress: where its numbering stands."""

    replica: int
    incarnation: str
    next_seq: int  # the number of the next TokenBatch this ingress will get from it


@dataclass(frozen=True)
class ReplicaHealth:
    """A scheduler's answer to the supervisor's health check."""

    replica: int
    incarnation: str
    failed: bool  # a step failed (a worker died, say): the replica must be rebuilt
    busy: bool  # it has work in flight
    seconds_since_progress: float  # since its last step ended (0 when idle)
    gpu_errors: tuple = ()  # problems its workers' GPUs reported (XID, ECC, fallen off the bus)


@dataclass
class KVEvents:
    """What one replica's prefix cache started and stopped holding since its last
    KVEvents (each block hash's last change only), or with `snapshot`, every hash
    it holds now. The hashes are block_pool.py's chained hashes, so they carry the
    LoRA id and the tenant salt (extra keys)."""

    replica: int
    epoch: str  # the scheduler incarnation: a rebuilt replica numbers afresh from an empty cache
    seq: int  # per epoch, from 0, one per message (a snapshot too): a gap means a lost message
    stored: list = field(default_factory=list)  # bytes hashes
    removed: list = field(default_factory=list)
    snapshot: bool = False  # stored is everything held now (removed is empty)
    # The replica's queue as the message leaves (a report every 0.2 s is stale for
    # requests shorter than that; these travel as often as the cache changes).
    num_waiting: int = 0
    num_running: int = 0
    kv_usage: float = 0.0


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
    num_waiting_tokens: int = 0  # prompt tokens of queued requests not computed yet (the router's queue cost)
    # LoRA adapters resident on the replica (names), and how many it may hold (0: unknown).
    adapters: list = field(default_factory=list)
    max_adapters: int = 0
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
    # Prefill/decode.
    role: str = "mixed"
    num_sending: int = 0  # prefill side: requests whose KV is held for a decode replica
    num_receiving: int = 0  # decode side: hand-offs waiting for room or pulling
    kv_transfers: int = 0  # pulls completed here (decode side), and their totals
    kv_transfer_failures: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    # The latest completed pulls: (number, backend, blocks, bytes, seconds), for histograms.
    recent_transfers: list = field(default_factory=list)
    gpus: list = field(default_factory=list)  # per rank: NVML telemetry (topology/gpu_health.py)
    # Finished requests by finish reason, and the per-request histograms (actors/metrics.py RequestMetrics).
    finished: dict = field(default_factory=dict)
    request_hist: dict = field(default_factory=dict)
    # Histogram snapshots by backend (actors/metrics.py Histogram): duration, bytes, blocks per pull.
    kv_transfer_seconds_hist: dict = field(default_factory=dict)
    kv_transfer_bytes_hist: dict = field(default_factory=dict)
    kv_transfer_blocks_hist: dict = field(default_factory=dict)
