"""Continuous batching with chunked prefill, prefix caching and preemption.

There is no prefill phase and no decode phase: each step has one token
budget (max_num_batched_tokens) that running requests spend first (a decode
costs 1, an unfinished prompt costs up to the rest of the budget), then
waiting requests, whose prompts may start from cached prefix blocks and be
split across steps. The default policy (fcfs) spends it in admission order;
under decode_first every decode runs first and, while anything decodes,
prompts get at most max_prefill_tokens of the budget, which bounds the step
time decodes wait on (inter-token latency) at a cost in throughput
(_split_budget).

When the KV cache cannot grow a running request, the most recently admitted
running request is preempted: its blocks are freed (they stay in the prefix
cache until evicted) and it goes back to the head of the queue to be
recomputed. Requests scheduled in a step are never preempted in that step,
so blocks registered in the prefix cache at allocation always hold their KV
by the time a later reader's attention runs (the forward stores every
token's KV before attending, layer by layer).

Prefill/decode. On a prefill replica a request marked `handoff` runs its
prompt and samples its first token like any other; then, instead of going
on, it leaves the batch as SENDING: its row is freed, its KV blocks are held
(`sending`) until the decode replica says it has pulled them
(`release_sent`). On a decode replica a hand-off arrives as WAITING_KV
(`add_remote`): each step first gives such requests their prompt's blocks
if the cache has room (after this replica's own prefix hits, so blocks it
already holds are not sent; none are offered to the prefix cache before
their KV is in), and emits a KVPull for the rest (`new_pulls`); the request
is RECEIVING until the pull returns (`kv_received`), then it enters the
queue's head with its blocks filled and decodes from its first token.
Aborting a SENDING or RECEIVING request never frees blocks a transfer may
still touch: the decode side ends it when its pull returns; the prefill side
when the decode side releases it (or dies, or a deadline passes).

The running batch's per-request counters live in numpy columns
(running.py), so a step over hundreds of decoding requests is a
few array operations; Python runs per request only where something happens
to it (a new KV block, a possible stop, preemption, admission).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ziggurat.actors.scheduler.kv_manager import KVCacheManager
from ziggurat.actors.scheduler.messages import StepUpdates
from ziggurat.actors.scheduler.request import Request, RequestStatus
from ziggurat.actors.scheduler.running import RunningSet, RowPool
from ziggurat.actors.scheduler.step_cost import StepCostModel
from ziggurat.models.step import CachedRequestData, GrammarMasks, NewRequestData, StepInput, StepOutput


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str = "fcfs"  # or "decode_first" (EngineConfig.schedule_policy)
    max_prefill_tokens: int = 2048  # decode_first: prompt tokens per step while requests decode
    target_step_s: float | None = None  # decode_first: size that share by time instead (EngineConfig.target_step_ms)


# decode_first with a target step time: the prompt share never drops below this many tokens,
# so prompts keep being admitted when the decodes alone fill the target.
MIN_PREFILL_SHARE = 256


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, default_eos_token_ids: tuple[int, ...] = ()):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running = RunningSet()  # admission order; counters as columns
        # Requests ending on these ids get the vectorized stop check.
        self.default_eos = tuple(default_eos_token_ids)
        self._eos = np.asarray(self.default_eos, dtype=np.int64)
        self.requests: dict[str, Request] = {}
        self._forget: list[int] = []  # rows the workers must free at the next step
        self.rows = RowPool()
        self.loras = None  # AdapterSlots (actors/scheduler/lora.py) when the engine serves LoRA adapters
        self.num_preemptions = 0
        # decode_first by time: the step-time fit, fed by the engine (step_timed) with each step's
        # shape as scheduled: step id -> (prompt tokens, decode rows, decode context).
        self.step_cost = StepCostModel() if config.policy == "decode_first" and config.target_step_s else None
        self._shapes: dict[int, tuple[int, int, int]] = {}
        self._decode_shape = (0, 0)
        # Prefill/decode (see the module docstring).
        self.sending: dict[str, Request] = {}  # prefill side: KV held for the decode replica
        self.remote_waiting: deque[Request] = deque()  # decode side: waiting for room
        self.receiving: dict[str, Request] = {}  # decode side: pull in flight
        self.new_pulls: list[tuple[Request, list[int], list[int]]] = []  # (request, src blocks, dst blocks)
        self.admitted: list[str] = []  # requests admitted for the first time since the caller last emptied this
        self.num_grammar = 0  # requests with a structured-output grammar (their masks are made per step)
        self.vocab_size = 0  # the logits' width, for the grammar masks (the engine sets it)
        self._bitmask = None  # the grammar masks' fill buffer (int32 [rows, vocab / 32])
        # Deferred sampling (the engine sets it when its executor can): a grammar request is
        # scheduled while its previous token is still in flight, and its mask is filled once
        # that token is accepted (masks_for), while the workers run the step's forward.
        # Without it, such a request waits for its token and its mask goes with the step.
        self.defer_masks = False
        self._sampling_grammar: list[Request] = []  # grammar requests that sample in the step being scheduled
        self._due: tuple[int, list[Request], np.ndarray] | None = None  # (step id, requests, rows) awaiting masks

    # -- admission -----------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        # The prompt was checked by the caller (request.prompt_error).
        room = self.config.max_model_len - req.num_prompt_tokens
        req.max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
        self.requests[req.request_id] = req
        self.num_grammar += req.grammar is not None
        self.waiting.append(req)

    def add_remote(self, req: Request) -> None:
        """A decode replica's hand-off: prompt + first token known, the prompt's KV
        to be pulled from `req.remote` (its source)."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        room = self.config.max_model_len - req.num_prompt_tokens
        req.max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
        req.status = RequestStatus.WAITING_KV
        self.requests[req.request_id] = req
        self.num_grammar += req.grammar is not None
        self.remote_waiting.append(req)

    def finish_requests(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                        reason: str | None = None, force: bool = False) -> list[Request]:
        """Finish requests from outside (abort, client gone, stop string seen).
        A request whose KV is in transit is not ended here (unless `force`: the
        replica is going down): a RECEIVING one ends when its pull returns
        (kv_received, with `reason`), a SENDING one when released."""
        done, drop, seen = [], [], set()
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.finished or rid in seen:
                continue
            seen.add(rid)
            if req.status == RequestStatus.RUNNING:
                drop.append(self.running.index(req))
            elif req.status == RequestStatus.WAITING or req.status == RequestStatus.PREEMPTED:
                self.waiting.remove(req)
            elif req.status == RequestStatus.WAITING_KV:
                self.remote_waiting.remove(req)
            elif not force:  # SENDING / RECEIVING
                if req.status == RequestStatus.RECEIVING and req.abort_reason is None:
                    req.abort_reason = reason or status.value
                continue
            else:
                self.sending.pop(rid, None)
                self.receiving.pop(rid, None)
            done.append(req)
        self.running.remove(drop)  # one compaction for the lot
        for req in done:
            req.status = status
            self._release(req)
        return done

    def step_dropped(self, step: StepInput) -> None:
        """A scheduled step that never reaches the workers (it was empty, or
        the engine failed): its rows to free go with the next one."""
        self._forget.extend(step.finished_rows)

    def steps_abandoned(self) -> None:
        """No output will be applied for any step scheduled so far (the engine
        failed, after ending every request). Steps that never reached the
        workers took their row frees with them, so the next step frees every
        row ever issued (workers ignore rows they do not hold)."""
        self.rows.done = self.rows.scheduled
        self._forget = list(range(self.rows.num_issued))

    @property
    def has_unfinished(self) -> bool:
        """Work a step can advance (requests whose KV is in transit wait on the transfer, not on steps)."""
        return bool(self.waiting or self.running or self.remote_waiting)

    # -- prefill/decode --------------------------------------------------------

    def release_sent(self, request_id: str) -> Request | None:
        """Prefill side: the decode replica has the KV (or is gone): free the blocks."""
        req = self.sending.pop(request_id, None)
        if req is not None:
            req.status = RequestStatus.FINISHED_STOPPED
            self.kv.free(request_id)
            del self.requests[request_id]
            self.num_grammar -= req.grammar is not None
        return req

    def kv_received(self, request_id: str, ok: bool) -> tuple[str, Request] | None:
        """Decode side: the pull for a RECEIVING request returned. ("ready", req): it
        is queued to decode; ("aborted", req): it was aborted meanwhile (req.abort_reason);
        ("failed", req): the pull failed. Both of the latter are ended and freed here."""
        req = self.receiving.pop(request_id, None)
        if req is None:
            return None
        if req.abort_reason is not None or not ok:
            req.status = RequestStatus.FINISHED_ABORTED
            self._release(req)
            return ("aborted" if req.abort_reason is not None else "failed"), req
        n = req.num_prompt_tokens
        self.kv.cache_blocks(request_id, req.all_token_ids, n)  # its KV is in: others may share it now
        req.num_computed_tokens = n
        req.preallocated = True
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        return "ready", req

    def expired(self, now: float, timeout_s: float) -> tuple[list[Request], list[Request]]:
        """Hand-offs past their deadline: (decode side: waiting for room longer than
        timeout_s, ended and freed here; prefill side: held longer than 3 x timeout_s
        without a release, freed here)."""
        late = [r for r in self.remote_waiting if now - r.since > timeout_s]
        for req in late:
            self.remote_waiting.remove(req)
            req.status = RequestStatus.FINISHED_ABORTED
            self._release(req)
        stale = [r for r in self.sending.values() if now - r.since > 3 * timeout_s]
        for req in stale:
            self.release_sent(req.request_id)
        return late, stale

    def _admit_remote(self) -> None:
        """Give waiting hand-offs their prompt's blocks, oldest first, while the cache
        has room (keeping a block of headroom per running request)."""
        bs = self.kv.block_size
        while self.remote_waiting:
            req = self.remote_waiting[0]
            rid, ids, n = req.request_id, req.all_token_ids, req.num_prompt_tokens
            need = -(-n // bs)
            if self.kv.num_free_blocks - need < len(self.running):
                break
            hit_ids, num_hit = self.kv.get_computed_blocks(rid, ids, req.cache_extra_keys)
            num_hit = min(num_hit, (n // bs) * bs)
            hit_ids = hit_ids[: num_hit // bs]
            blocks = self.kv.allocate_slots(rid, ids, num_hit, n - num_hit, hit_ids, req.cache_extra_keys, cache=False)
            if blocks is None:
                break
            self.remote_waiting.popleft()
            req.status = RequestStatus.RECEIVING
            self.receiving[rid] = req
            first = num_hit // bs
            table = self.kv.get_block_ids(rid)
            src = list(req.remote.src_block_ids[first:need])
            self.new_pulls.append((req, src, table[first:need]))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step --------------------------------------------------------------

    def schedule(self) -> StepInput:
        step = StepInput(finished_rows=self._forget, step_id=self.rows.scheduled)
        self.rows.scheduled += 1
        self._forget = []
        self._decode_shape = (0, 0)
        if self.remote_waiting:
            self._admit_remote()
        budget, preempted = self._schedule_running(step, self.config.max_num_batched_tokens)
        new_rows, new_n = [], []

        # Admit waiting requests only if nobody had to be preempted: the cache
        # is under pressure, and admitting would preempt someone next step.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self.loras is not None and not self.loras.fits(req):  # max_loras distinct adapters run already
                if not self.loras.first_fitting(self.waiting):
                    break
                req = self.waiting[0]
            if req.preallocated:  # a decode hand-off: its prompt's KV is in its blocks already
                hit_ids, num_hit = (), req.num_computed_tokens
            else:
                hit_ids, num_hit = self.kv.get_computed_blocks(req.request_id, req.all_token_ids,
                                                               req.cache_extra_keys)
            n = min(req.num_tokens - num_hit, budget)
            new_blocks = self.kv.allocate_slots(
                req.request_id, req.all_token_ids, num_hit, n, hit_ids, req.cache_extra_keys
            )
            if new_blocks is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.preallocated = False
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                self.admitted.append(req.request_id)  # first admission (the loop meters its queue time)
            self._add_new_to_step(step, req, n)
            self.running.append(req, self.kv.fast_limits(req.request_id), self.default_eos)
            new_rows.append(req.row)
            new_n.append(n)
            budget -= n
        if new_rows:
            step.rows = np.concatenate([step.rows, np.asarray(new_rows, dtype=np.int32)])
            step.num_tokens = np.concatenate([step.num_tokens, np.asarray(new_n, dtype=np.int32)])
        if self.loras is not None and self.loras.outbox:
            step.lora_prefetch = self.loras.take_outbox()
        if self._sampling_grammar:
            reqs, self._sampling_grammar = self._sampling_grammar, []
            step.grammar_rows = np.fromiter((r.row for r in reqs), dtype=np.int32, count=len(reqs))
            if self.defer_masks:
                self._due = (step.step_id, reqs, step.grammar_rows)
            else:
                step.grammar_bitmask = self._fill_masks(reqs)
        if self.step_cost is not None and len(step.rows):
            d, ctx = self._decode_shape
            if len(self._shapes) > 64:  # steps the engine dropped or never timed
                self._shapes.clear()
            self._shapes[step.step_id] = (int(step.num_tokens.sum()) - d, d, ctx)
        return step

    def step_timed(self, step_id: int, seconds: float) -> None:
        """The engine measured step `step_id`'s device time: feed the step-time fit."""
        shape = self._shapes.pop(step_id, None)
        if shape is not None and self.step_cost is not None:
            self.step_cost.observe(*shape, seconds)

    def masks_for(self, step: StepInput) -> GrammarMasks | None:
        """Deferred sampling: the grammar masks of `step` (the last one scheduled), filled now
        that every token before it is accepted. Requests that ended meanwhile are left out."""
        due, self._due = self._due, None
        if due is None or due[0] != step.step_id:
            return None
        _, reqs, rows = due
        live = [j for j, r in enumerate(reqs) if not r.finished]
        if not live:
            return None
        if len(live) < len(reqs):
            reqs, rows = [reqs[j] for j in live], rows[live]
        return GrammarMasks(rows, self._fill_masks(reqs))

    def _fill_masks(self, reqs: list[Request]) -> np.ndarray:
        """The allowed-token bitmask of each request's next token (its grammar's state now)."""
        from ziggurat.actors.scheduler.structured import allocate_bitmask

        # Reused every step: a step's launch (in-process, or its serialization for worker
        # processes) reads the rows out before the next masks are filled.
        if self._bitmask is None or self._bitmask.shape[0] < len(reqs):
            self._bitmask = allocate_bitmask(max(len(reqs), 64), self.vocab_size)
        bitmask = self._bitmask
        for j, r in enumerate(reqs):  # (xgrammar's threaded batch fill measured slower: BENCHMARKS.md)
            r.grammar.fill_bitmask(bitmask, j)
        return self._bitmask[: len(reqs)].numpy()

    def _schedule_running(self, step: StepInput, budget: int) -> tuple[int, bool]:
        """Spend the budget on running requests in admission order: each runs
        its known-but-uncomputed tokens (a decode: one), as far as the budget
        goes. Array operations for the batch; Python only for requests that
        need KV blocks (or a full block cached), and for preemption when the
        cache has no room: the last admitted request is freed, then the next."""
        rs = self.running
        m = len(rs)
        if m == 0:
            return budget, False
        c, k, p = rs.computed[:m].copy(), rs.known[:m], rs.pending[:m]  # c: as before this step
        want = k + p - c
        # Nothing to run until its pending token arrives, or it ends then.
        ends = (p > 0) & ((rs.out[:m] + p >= rs.max_out[:m]) | (k + p >= self.config.max_model_len))
        want[ends] = 0
        if self.num_grammar and not self.defer_masks:  # a grammar's next mask needs its pending token: wait for it
            want[(p > 0) & rs.grammar[:m]] = 0
        n, admit_budget = self._split_budget(want, budget, c)
        total = c + n
        slow = np.flatnonzero((n > 0) & ((total > rs.kv_cap[:m]) | (np.minimum(total, k) >= rs.kv_cache_lim[:m])))
        new_blocks: dict[int, list[int]] = {}
        preempted = False
        for i in slow.tolist():
            if i >= len(rs):
                break  # preempted below, with everything after it
            req = rs.reqs[i]
            blocks = self._allocate(req, int(n[i]), int(c[i]), int(p[i]))
            while blocks is None:
                victim = rs.pop()  # lowest priority: admitted last
                self._preempt(victim, step)
                preempted = True
                if victim is req:
                    break
                blocks = self._allocate(req, int(n[i]), int(c[i]), int(p[i]))
            if blocks is None:
                break
            new_blocks[i] = blocks
            rs.kv_cap[i], rs.kv_cache_lim[i] = self.kv.fast_limits(req.request_id)
        m = len(rs)
        n, c = n[:m], c[:m]
        ran = n > 0
        new_c = c + n
        # A request whose known tokens are all computed after this step samples
        # one: pending until the step's output arrives.
        samples = ran & (new_c == rs.known[:m] + rs.pending[:m])
        rs.pending[:m] += samples
        if self.num_grammar:
            self._sampling_grammar.extend(rs.reqs[i] for i in np.flatnonzero(samples & rs.grammar[:m]).tolist())
        rs.computed[:m] = new_c
        if ran.all():
            step.rows, step.num_tokens = rs.row[:m].astype(np.int32), n.astype(np.int32)
        else:
            step.rows, step.num_tokens = rs.row[:m][ran].astype(np.int32), n[ran].astype(np.int32)
        for i, blocks in new_blocks.items():
            if blocks and i < m:
                step.cached_requests.append(CachedRequestData(int(rs.row[i]), list(blocks), int(c[i])))
        return admit_budget, preempted

    def _split_budget(self, want: np.ndarray, budget: int, computed: np.ndarray) -> tuple[np.ndarray, int]:
        """Tokens each running request runs this step (it wants `want`), and the budget
        left for admitting waiting requests.

        fcfs: the budget in admission order; a long prompt admitted earlier may take what
        the decodes after it needed, and a step with 8,192 prompt tokens takes ~230 ms on an
        8B model, which every decode in it waits for.

        decode_first: every decode (want == 1) first; then, while anything decodes, at most
        max_prefill_tokens prompt tokens (running chunks in admission order, then
        admissions), so a step lasts about the time of its decodes plus that many prompt
        tokens (on `nvidia-h200`, 8B bf16: ~28 us per prompt token in a large chunk, so 2,048
        tokens add ~57 ms). With nothing decoding, prompts get the whole budget.

        decode_first with target_step_s: the share is what the step-time fit (StepCostModel,
        from the engine's timings of earlier steps) says fits beside this step's decodes and
        their context within the target, at least MIN_PREFILL_SHARE; max_prefill_tokens until
        the fit is ready."""
        if self.config.policy == "fcfs":
            n = np.minimum(want, np.maximum(budget - (np.cumsum(want) - want), 0))
            return n, budget - int(n.sum())
        dec = (want == 1).astype(want.dtype)
        n = np.minimum(dec, np.maximum(budget - (np.cumsum(dec) - dec), 0))
        left = budget - int(n.sum())
        share = self.config.max_prefill_tokens
        if self.step_cost is not None:
            rows, ctx = int(n.sum()), int(computed[n > 0].sum())
            self._decode_shape = (rows, ctx)
            fit = self.step_cost.prompt_tokens_within(self.config.target_step_s, rows, ctx)
            if fit is not None:
                share = max(MIN_PREFILL_SHARE, fit)
        cap = min(left, share) if n.any() else left
        big = np.where(want > 1, want, 0)
        nb = np.minimum(big, np.maximum(cap - (np.cumsum(big) - big), 0))
        return n + nb, cap - int(nb.sum())

    def _allocate(self, req: Request, n: int, computed: int, pending: int):
        return self.kv.allocate_slots(req.request_id, req.all_token_ids, computed, n, (), req.cache_extra_keys, pending)

    def _add_new_to_step(self, step: StepInput, req: Request, n: int) -> None:
        """An admitted request: sent to the workers whole (it is new to them,
        or resumes after preemption), in a fresh row. The caller adds its
        row and `n` to the step's batch."""
        req.row = self.rows.take()
        if self.loras is not None:
            self.loras.take(req)
        step.new_requests.append(
            NewRequestData(
                req_id=req.request_id,
                row=req.row,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=list(req.output_token_ids),
                sampling_params=req.sampling_params,
                block_ids=list(self.kv.get_block_ids(req.request_id)),
                num_computed_tokens=req.num_computed_tokens,
            )
        )
        # Computed as of the end of this step; the sampled token (if any)
        # arrives with the step's output and is pending until then.
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens + req.num_pending:
            req.num_pending += 1
            if req.grammar is not None:
                self._sampling_grammar.append(req)

    def _preempt(self, req: Request, step: StepInput) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_pending = 0  # a token still in flight for it is dropped on arrival
        req.num_preemptions += 1
        self.num_preemptions += 1
        if req.row >= 0:
            step.finished_rows.append(req.row)
            self._free_row(req)
        self.waiting.appendleft(req)

    # -- after the step --------------------------------------------------------

    def update_from_output(self, step: StepInput, out: StepOutput) -> StepUpdates:
        """Take one step's sampled tokens: append them, find the requests that
        stop, free those. Columns for the batch; Python for the few that may stop."""
        rs = self.running
        ups = StepUpdates()
        self.rows.done = step.step_id + 1  # steps are applied in order
        if out.lora_staged and self.loras is not None:
            self.loras.staged_done(out.lora_staged)
        if not len(out.rows):
            return ups
        idx = rs.row_pos[out.rows]  # -1: the row's request is gone (its row not reused yet: RowPool)
        toks = out.token_ids.astype(np.int64)
        # Requests gone (finished, aborted, preempted while the step ran) or
        # with no token expected drop their entry.
        keep = idx >= 0
        keep[keep] = rs.pending[idx[keep]] > 0
        if not keep.all():
            entries = np.flatnonzero(keep)
            idx, toks = idx[keep], toks[keep]
        else:
            entries = None
        if not len(idx):
            return ups
        rs.pending[idx] -= 1
        rs.known[idx] += 1
        rs.out[idx] += 1
        ii, tok_list = idx.tolist(), toks.tolist()
        reqs = rs.reqs
        sel = [reqs[i] for i in ii]
        for r, t in zip(sel, tok_list):
            r.all_token_ids.append(t)
            r.output_token_ids.append(t)
        rejected = []
        if self.num_grammar:
            # Past its end a grammar allows only stop tokens (ignore_eos, min_tokens): nothing to accept.
            js = [j for j in np.flatnonzero(rs.grammar[idx]).tolist() if not sel[j].grammar.is_terminated()]
            if js:
                ok = [sel[j].grammar.accept(tok_list[j]) for j in js]
                rejected = [j for j, good in zip(js, ok) if not good]  # cannot happen with the mask applied
        lps = out.logprobs
        if lps is not None and lps.count(None) != len(lps):
            for j, r in enumerate(sel):
                lp = lps[j if entries is None else int(entries[j])]
                if lp is not None:
                    r.output_logprobs.append(lp)
                    ups.logprobs[r.request_id] = lp
        # Who may stop: at the length limit, or past min_tokens with an
        # end-of-sequence id (or a stop-id request): checked exactly in Python.
        n_out = rs.out[idx]
        maybe = (n_out >= rs.max_out[idx]) | (rs.known[idx] >= self.config.max_model_len)
        eos = self._eos
        eos_hit = (toks == eos[0]) if len(eos) == 1 else (toks[:, None] == eos).any(1)  # np.isin is slow here
        maybe |= (n_out >= rs.min_tokens[idx]) & (rs.py_stop[idx] | eos_hit)
        done, handoff = [], []
        for j in rejected:
            sel[j].abort_reason = "structured output: a sampled token is outside the grammar"
            done.append((ii[j], sel[j], RequestStatus.FINISHED_ABORTED))
            maybe[j] = False
        for j in np.flatnonzero(maybe).tolist():
            req = sel[j]
            end = self._check_stop(req, tok_list[j])
            if end is not None:
                done.append((ii[j], req, end))
            elif req.handoff:  # prefill side: the first token is out; the decode replica goes on
                handoff.append((ii[j], req))
        ups.request_ids = [r.request_id for r in sel]
        ups.token_ids = tok_list
        ups.num_prompt_tokens = rs.prompt[idx].tolist()
        ups.num_cached_tokens = rs.cached[idx].tolist()
        ups.num_output_tokens = n_out.tolist()
        if done or handoff:
            rs.remove([i for i, _, _ in done] + [i for i, _ in handoff])
            for _, req, end in done:
                req.status = end
                ups.finished[req.request_id] = (end.value, req.stop_reason)
                self._release(req)
            for _, req in handoff:
                req.status = RequestStatus.SENDING
                req.since = time.monotonic()
                self.sending[req.request_id] = req
                self._forget.append(req.row)  # the workers are done with it; its blocks stay
                self._free_row(req)
                ups.handoffs.append(req.request_id)
        return ups

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
        if req.row >= 0:
            self._forget.append(req.row)
            self._free_row(req)
        del self.requests[req.request_id]
        self.num_grammar -= req.grammar is not None

    def _free_row(self, req: Request) -> None:
        if self.loras is not None:
            self.loras.release(req)
        self.rows.release(req.row)
        req.row = -1
