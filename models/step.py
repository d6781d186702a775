"""The typed messages between a scheduler and its workers, one pair per step.

The scheduler sends a diff: new requests in full, requests the workers
already hold only when they got new KV blocks. Workers keep each request's
token ids and computed count themselves (rank 0 samples and broadcasts; a
scheduled request advances by its scheduled tokens), so a running request
costs a row number and a token count per step, not its whole history.

A running request is known to the workers by its *row*: a small integer the
scheduler assigns on admission (NewRequestData.row) and takes back with
`finished_rows`; it is the request's row in every per-request table a worker
keeps (block table, sampling parameters). The per-step batch is therefore two
int32 arrays, and both messages pickle as a few byte strings: no per-request
Python objects cross the process boundary on a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ziggurat.sampling_params import SamplingParams


def _ints(values=()) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


@dataclass
class NewRequestData:
    req_id: str
    row: int  # the request's row in the workers' tables until a finished_rows entry frees it
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resuming after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix hit)


@dataclass
class CachedRequestData:
    """A running request that got new KV blocks this step."""

    row: int
    new_block_ids: list[int]
    num_computed_tokens: int  # before this step (the workers' own count must agree)


@dataclass
class StepInput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # The batch, in order: each request's row and the tokens it runs this step.
    rows: np.ndarray = field(default_factory=_ints)
    num_tokens: np.ndarray = field(default_factory=_ints)
    # Rows the workers must free (finished, aborted or preempted requests),
    # applied before this step's new requests take their rows.
    finished_rows: list[int] = field(default_factory=list)
    step_id: int = -1  # the scheduler's own count (workers ignore it)
    inject_fault: bool = False  # a failure drill: every rank raises on this step (see EngineCore)
    # Structured outputs: the rows whose token this step samples under a grammar, and
    # each one's allowed-token bitmask (int32 [k, ceil(vocab / 32)], bit t = token t).
    # Rows without a bitmask: the masks are not known yet (their tokens from the step
    # in flight must reach the grammars first); the workers run the forward and wait
    # for GrammarMasks before sampling (deferred sampling; see EngineCore.step).
    grammar_rows: np.ndarray | None = None
    grammar_bitmask: np.ndarray | None = None
    # The previous step's deferred masks, when they travel with the next step (the
    # pipelined worker actor samples that step before launching this one).
    prev_masks: "GrammarMasks | None" = None
    # LoRA: adapters to read into host memory ahead of the requests that wait for them
    # (LoRARequest each); the workers say when in StepOutput.lora_staged.
    lora_prefetch: list | None = None

    @property
    def defers_sampling(self) -> bool:
        return self.grammar_rows is not None and self.grammar_bitmask is None

    @property
    def total_tokens(self) -> int:
        return int(self.num_tokens.sum())

    @property
    def is_empty(self) -> bool:
        return len(self.rows) == 0

    def scheduled(self):
        """(row, tokens) pairs in batch order."""
        return zip(self.rows.tolist(), self.num_tokens.tolist())

    def __reduce__(self):
        return _step_input, (self.new_requests, self.cached_requests, _ints(self.rows).tobytes(),
                             _ints(self.num_tokens).tobytes(), self.finished_rows, self.step_id, self.inject_fault,
                             self.grammar_rows, self.grammar_bitmask, self.prev_masks, self.lora_prefetch)


def _step_input(new, cached, rows: bytes, num_tokens: bytes, finished, step_id, fault=False, grammar_rows=None,
                grammar_bitmask=None, prev_masks=None, lora_prefetch=None) -> StepInput:
    return StepInput(new, cached, np.frombuffer(rows, dtype=np.int32), np.frombuffer(num_tokens, dtype=np.int32),
                     finished, step_id, fault, grammar_rows, grammar_bitmask, prev_masks, lora_prefetch)


@dataclass
class GrammarMasks:
    """A deferred step's grammar masks, sent once the grammars have the tokens before it:
    rows[j]'s allowed tokens are bitmask[j] (a subset of the step's grammar_rows; rows
    left out sample unmasked: their requests ended meanwhile)."""

    rows: np.ndarray
    bitmask: np.ndarray


@dataclass
class Logprobs:
    """One step's logprobs for one request: the sampled token's and the top-k."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class StepOutput:
    # The rows that produced a token this step, in batch order (prefill
    # chunks that did not reach the end of the known tokens produce none),
    # and their tokens.
    rows: np.ndarray = field(default_factory=_ints)
    token_ids: np.ndarray = field(default_factory=_ints)
    # Per entry, or None when no request of the step asked for logprobs.
    logprobs: list[Logprobs | None] | None = None
    # LoRA: adapter keys whose prefetch (StepInput.lora_prefetch) finished since the last output.
    lora_staged: list[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __reduce__(self):
        return _step_output, (_ints(self.rows).tobytes(), _ints(self.token_ids).tobytes(), self.logprobs,
                              self.lora_staged)


def _step_output(rows: bytes, token_ids: bytes, logprobs, lora_staged=None) -> StepOutput:
    return StepOutput(np.frombuffer(rows, dtype=np.int32), np.frombuffer(token_ids, dtype=np.int32), logprobs,
                      lora_staged)


# -- KV transfer between replicas (prefill -> decode): models/kv_transfer.py ------------------


@dataclass(frozen=True)
class KVEndpoint:
    """What one source rank publishes so that destination ranks can pull its blocks."""

    key: str  # unique per worker process and cache: "<replica>/<incarnation>/<rank>"
    rank: int
    tp_size: int
    num_kv_heads: int  # the model's, all ranks together
    location: object  # topology.kv_transport.Location
    ipc_handles: list | None = None  # CUDA: per (layer, k|v) tensor, its IPC handle
    store_address: tuple | None = None  # its pair-group rendezvous (host, port)
    worker: object = None  # a handle the destination asks to join a pair group (kv_serve); None in-process


@dataclass
class KVPull:
    """One request's prompt blocks to copy from a source replica into ours (every rank pulls its heads)."""

    request_id: str
    sources: list  # the source replica's KVEndpoints, by rank
    src_block_ids: list[int]
    dst_block_ids: list[int]


@dataclass(frozen=True)
class KVTransferRecord:
    """One destination rank's part of one pull (metrics and benchmarks)."""

    request_id: str
    backend: str  # local | ipc | group
    blocks: int
    bytes: int  # payload bytes written into this rank's cache
    seconds: float
    error: str | None = None
