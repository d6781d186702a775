"""A request as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ziggurat.models.step import Logprobs
from ziggurat.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    # Prefill/decode. Prefill side: the first token is out, the KV is held for the
    # decode replica until it says it has pulled it. Decode side: waiting for room
    # for the prompt's blocks, then pulling them from the prefill replica.
    SENDING = "sending"
    WAITING_KV = "waiting_kv"
    RECEIVING = "receiving"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset((RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED))


def cache_extra_keys(lora=None, salt: str | None = None) -> tuple:
    """What a request mixes into its prefix-cache block hashes: (its adapter's key, its cache salt).
    KV computed under one adapter is never reused under another (or under the base model)."""
    return (lora.key if lora is not None else None, salt)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    # Mixed into every prefix-cache block hash: (lora id, cache salt).
    cache_extra_keys: tuple = ()
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Logprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled by steps still running (async scheduling): scheduled as
    # this request's next inputs before their ids are known.
    num_pending: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 until then
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Its row in the workers (models/step.py) while they hold its state (sent
    # as new, not since finished or preempted); -1 otherwise.
    row: int = -1
    # Prefill/decode (see Scheduler): on a prefill replica, hand off after the
    # first token; on a decode replica, the hand-off it came with (its KV source)
    # until the KV has arrived.
    handoff: bool = False
    remote: object = None
    preallocated: bool = False  # its prompt's blocks are allocated and filled (pulled): admit without a lookup
    abort_reason: str | None = None  # aborted while its KV was in flight: ends when the pull returns
    since: float = 0.0  # when it entered its current hand-off state (deadlines)
    grammar: object = None  # structured outputs: its GrammarState (actors/scheduler/structured.py)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        p = self.sampling_params
        self.max_tokens = p.max_tokens
        lora = p.lora_request
        if lora is not None and (self.cache_extra_keys[:1] or (None,))[0] != lora.key:
            # The adapter keys its KV whatever the caller passed (the ingress passes it already).
            self.cache_extra_keys = cache_extra_keys(lora, self.cache_extra_keys[1] if len(self.cache_extra_keys) > 1
                                                     else None)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.finished else None

