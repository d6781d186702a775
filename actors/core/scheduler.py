"""Continuous batching with chunked prefill, prefix caching and preemption.

There is no prefill phase and no decode phase: each step has one token
budget (max_num_batched_tokens) that running requests spend first (a decode
costs 1, an unfinished prompt costs up to the rest of the budget), then
waiting requests, whose prompts may start from cached prefix blocks and be
split across steps.

When the KV cache cannot grow a running request, the most recently admitted
running request is preempted: its blocks are freed (they stay in the prefix
cache until evicted) and it goes back to the head of the queue to be
recomputed. Requests scheduled in a step are never preempted in that step,
so blocks registered in the prefix cache at allocation always hold their KV
by the time a later reader's attention runs (the forward stores every
token's KV before attending, layer by layer).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ziggurat.actors.core.kv_manager import KVCacheManager
from ziggurat.actors.core.request import Request, RequestStatus
from ziggurat.models.step import CachedRequestData, Logprobs, NewRequestData, StepInput, StepOutput


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


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


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._forget: list[str] = []  # ids the workers must drop at the next step
        self.num_preemptions = 0

    # -- admission -----------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        # The prompt was checked by the caller (request.prompt_error).
        room = self.config.max_model_len - req.num_prompt_tokens
        req.max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[Request]:
        """Finish requests from outside (abort, client gone, stop string seen)."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._release(req)
            done.append(req)
        return done

    def forget_later(self, request_ids: list[str]) -> None:
        """Ids a step could not carry (it was empty): send them with the next."""
        self._forget.extend(request_ids)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step --------------------------------------------------------------

    def schedule(self) -> StepInput:
        step = StepInput(finished_req_ids=self._forget)
        self._forget = []
        budget = self.config.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if n == 0 or req.num_pending and self._done_when_pending_arrive(req):
                i += 1  # nothing to run until its pending token arrives, or it ends then
                continue
            new_blocks = self._allocate(req, n)
            while new_blocks is None:
                victim = self.running.pop()  # lowest priority: admitted last
                self._preempt(victim, step)
                preempted = True
                if victim is req:
                    break
                new_blocks = self._allocate(req, n)
            if new_blocks is None:
                break
            self._add_to_step(step, req, n, new_blocks)
            budget -= n
            i += 1

        # Admit waiting requests only if nobody had to be preempted: the cache
        # is under pressure, and admitting would preempt someone next step.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit_ids, num_hit = self.kv.get_computed_blocks(req.request_id, req.all_token_ids, req.cache_extra_keys)
            n = min(req.num_tokens - num_hit, budget)
            new_blocks = self.kv.allocate_slots(
                req.request_id, req.all_token_ids, num_hit, n, hit_ids, req.cache_extra_keys
            )
            if new_blocks is None:
                break
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            self._add_to_step(step, req, n, new_blocks)
            budget -= n
        return step

    def _allocate(self, req: Request, n: int):
        return self.kv.allocate_slots(
            req.request_id, req.all_token_ids, req.num_computed_tokens, n, (), req.cache_extra_keys, req.num_pending
        )

    def _done_when_pending_arrive(self, req: Request) -> bool:
        """Whether the request reaches a length limit with its pending tokens
        (no need to run it further; it finishes when they arrive)."""
        return (req.num_output_tokens + req.num_pending >= req.max_tokens
                or req.num_tokens + req.num_pending >= self.config.max_model_len)

    def _add_to_step(self, step: StepInput, req: Request, n: int, new_blocks: list[int]) -> None:
        if req.in_workers:
            step.cached_requests.append(CachedRequestData(req.request_id, list(new_blocks), req.num_computed_tokens))
        else:
            step.new_requests.append(
                NewRequestData(
                    req_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=list(req.output_token_ids),
                    sampling_params=req.sampling_params,
                    block_ids=list(self.kv.get_block_ids(req.request_id)),
                    num_computed_tokens=req.num_computed_tokens,
                )
            )
            req.in_workers = True
        step.num_scheduled_tokens[req.request_id] = n
        # Computed as of the end of this step; the sampled token (if any)
        # arrives with the step's output and is pending until then.
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens + req.num_pending:
            req.num_pending += 1

    def _preempt(self, req: Request, step: StepInput) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_pending = 0  # a token still in flight for it is dropped on arrival
        req.num_preemptions += 1
        self.num_preemptions += 1
        if req.in_workers:
            step.finished_req_ids.append(req.request_id)
            req.in_workers = False
        self.waiting.appendleft(req)

    # -- after the step --------------------------------------------------------

    def update_from_output(self, step: StepInput, out: StepOutput) -> list[RequestUpdate]:
        # Hot path (every request, every step): plain attribute access, no properties.
        updates = []
        requests, running = self.requests, RequestStatus.RUNNING
        for rid, token, lp in zip(out.req_ids, out.token_ids, out.logprobs):
            req = requests.get(rid)
            if req is None or req.status is not running or req.num_pending == 0:
                continue  # aborted, preempted, or finished while the step ran
            req.num_pending -= 1
            req.append_token(token, lp)
            end = self._check_stop(req, token)
            if end is not None:
                req.status = end
                self.running.remove(req)
                self._release(req)
            updates.append(RequestUpdate(
                rid, [token], [lp] if lp is not None else [], end.value if end is not None else None,
                req.stop_reason, len(req.prompt_token_ids), max(req.num_cached_tokens, 0),
                len(req.output_token_ids)))
        return updates

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        """The status the request ends with after `token`, or None to go on."""
        p = req.sampling_params
        n_out = len(req.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or len(req.all_token_ids) >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _release(self, req: Request) -> None:
        self.kv.free(req.request_id)
        if req.in_workers:
            self._forget.append(req.request_id)
            req.in_workers = False
        del self.requests[req.request_id]
