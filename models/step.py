"""The typed messages between a scheduler and its workers, one pair per step.

The scheduler sends a diff: new requests in full, requests the workers
already hold only when they got new KV blocks. Workers keep each request's
token ids and computed count themselves (rank 0 samples and broadcasts; a
scheduled request advances by its scheduled tokens), so a running request
costs its id and a token count per step, not its whole history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ziggurat.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resuming after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix hit)


@dataclass
class CachedRequestData:
    """A running request that got new KV blocks this step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int  # before this step (the workers' own count must agree)


@dataclass
class StepInput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Batch order is this dict's order: request id -> tokens to run this step.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests the workers must forget (finished, aborted or preempted).
    finished_req_ids: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


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
    # Requests that produced a token this step (prefill chunks that did not
    # reach the end of the known tokens produce none).
    req_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs | None] = field(default_factory=list)
