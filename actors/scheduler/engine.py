"""EngineCore: one replica's loop. step() = schedule, execute, update.

    step = scheduler.schedule()          # which tokens of which requests run now
    out  = executor.wait(executor.execute_async(step))   # forward + sample on the TP workers
    return scheduler.update_from_output(step, out)   # append tokens, stop, free
"""

from __future__ import annotations

import itertools
import os
import time

from ziggurat.actors.scheduler.executor import make_executor
from ziggurat.actors.scheduler.kv_manager import KVCacheManager
from ziggurat.actors.scheduler.request import Request, RequestStatus
from ziggurat.actors.scheduler.messages import StepUpdates
from ziggurat.actors.scheduler.scheduler import Scheduler, SchedulerConfig
from ziggurat.actors.scheduler.validation import ModelLimits, RequestError, check_request
from ziggurat.config import ConfigError, EngineConfig
from ziggurat.models.config import ModelConfig
from ziggurat.models.step import KVPull, KVTransferRecord
from ziggurat.sampling_params import SamplingParams


class StepFailed(RuntimeError):
    """The workers failed a step; `requests` are the requests that were live (now aborted)."""

    def __init__(self, requests):
        super().__init__(f"a step failed; {len(requests)} request(s) aborted")
        self.requests = requests


class EngineCore:
    def __init__(self, config: EngineConfig, executor_factory=make_executor):
        """executor_factory(config, max_model_len) starts the workers: in-process,
        one process per TP rank (executor.py), or Ray worker actors (compiled_graph.py)."""
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model, config.dtype)
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        if max_len > self.model_config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len: {max_len} exceeds the model's max_position_embeddings "
                f"({self.model_config.max_position_embeddings})"
            )
        self.executor = executor_factory(config, max_len)
        num_blocks = self.executor.determine_num_blocks()
        if num_blocks < 1:
            raise ConfigError("no memory is left for the KV cache; lower the load or raise gpu_memory_utilization")
        self.executor.initialize_cache(num_blocks)
        self.num_blocks = num_blocks
        # A lone request must always fit, or preemption could never make room.
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        self.limits = ModelLimits(self.max_model_len, self.model_config.vocab_size,
                                  config.max_lora_rank if config.enable_lora else 0)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            config.schedule_policy, config.max_prefill_tokens,
                            config.target_step_ms / 1e3 if config.target_step_ms else None), self.kv,
            tuple(self.model_config.eos_token_ids),
        )
        self.scheduler.vocab_size = self.model_config.vocab_size
        if config.enable_lora:  # the per-batch adapter cap and the mirror of the workers' slots
            from ziggurat.actors.scheduler.lora import AdapterSlots
            from ziggurat.models.lora import LoRALimits

            lim = LoRALimits.of(config)
            self.scheduler.loras = AdapterSlots(lim.max_loras, lim.max_cpu_loras)
        self._grammars = None  # GrammarCompiler, made with the first structured-output request
        self._ids = itertools.count()
        self._inflight = None  # (StepInput, executor handle) submitted, outputs not yet applied
        # Only worth it when the executor runs a step while the scheduler works.
        self.async_scheduling = config.async_scheduling and getattr(self.executor, "overlaps", True)
        # Grammar requests run every step: the next step's forward is launched before this
        # step's tokens are accepted, and its masks follow (see step()).
        self.scheduler.defer_masks = self.async_scheduling and getattr(self.executor, "defers_sampling", False)
        # Failure drills: when this file appears, the next step fails on every rank
        # (extra={"inject_fault_file": path}; tests and scripts/chaos.py use it).
        self._fault_file = config.extra.get("inject_fault_file")
        # Seconds spent in each part of step(), summed (the control-plane benchmark reports them).
        self.seconds = {"schedule": 0.0, "launch": 0.0, "wait": 0.0, "update": 0.0, "masks": 0.0}
        # Step device times for the scheduler's step-time fit (decode_first by time): a step runs from
        # its launch or the previous step's end, whichever is later, to the moment its output is back.
        self.clock = time.perf_counter  # (scripts/sim_schedule.py runs the engine on a simulated clock)
        self._launched: dict[int, float] = {}
        self._last_done = 0.0
        self._kv_sources = None
        self._pulls: list = []  # (executor handle, request ids) of KV pulls in flight
        self._ready_pulls: list = []  # hand-offs that needed no transfer

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_extra_keys: tuple = (),
        checked: bool = False,
        handoff: bool = False,
    ) -> str:
        """Queue a request (RequestError if validation.py's rules refuse it).
        checked=True: the caller ran check_request on this engine already (the
        scheduler loop's submit), so it is not run twice."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not checked:
            self.check_request(prompt_token_ids, params)
        if not params._eos_token_ids:
            params = params.clone(_eos_token_ids=tuple(self.model_config.eos_token_ids))
        req = Request(
            request_id=rid,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            eos_token_ids=params._eos_token_ids,
            cache_extra_keys=cache_extra_keys,
            handoff=handoff,
        )
        req.grammar = self.grammar_state(params)
        self.scheduler.add_request(req)
        return rid

    def grammar_state(self, params: SamplingParams, accepted: list[int] = ()):
        """Structured outputs: the request's GrammarState, having accepted `accepted`;
        None without a constraint."""
        compiled = self._compiled_grammar(params)
        if compiled is None:
            return None
        from ziggurat.actors.scheduler.structured import GrammarState

        return GrammarState.rebuild(compiled, list(accepted)) if accepted else GrammarState(compiled)

    def _compiled_grammar(self, params: SamplingParams):
        """The request's constraint compiled (once per distinct constraint, cached), or None;
        RequestError naming the field if it is invalid."""
        if params.structured_outputs is None:
            return None
        from ziggurat.actors.scheduler import structured as so

        try:
            spec = so.GrammarSpec.from_openai(params.structured_outputs.as_body())
            if spec is None:
                return None
            if self._grammars is None:
                from ziggurat.models.tokenizer import Tokenizer

                self._grammars = so.GrammarCompiler(Tokenizer(self.config.model), self.model_config.vocab_size,
                                                    stop_token_ids=list(self.model_config.eos_token_ids))
            return self._grammars.compile(spec)
        except so.StructuredOutputError as e:
            raise RequestError(str(e), e.field) from None

    def check_request(self, prompt_token_ids, params: SamplingParams, param: str = "prompt") -> None:
        check_request(prompt_token_ids, params, self.limits, param)
        self._compiled_grammar(params)  # a constraint compiles (and is cached), or its field is named

    def resident_adapters(self) -> list[str]:
        """Names of the LoRA adapters this replica holds in memory (GPU slots or host): serving
        them reads no disk. Cheap (the scheduler's mirror of the workers' tables)."""
        return self.scheduler.loras.resident() if self.scheduler.loras is not None else []

    def abort(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED, reason: str | None = None,
              force: bool = False) -> list[Request]:
        return self.scheduler.finish_requests(request_ids, status, reason, force)

    # -- prefill/decode (see Scheduler) ------------------------------------------------------

    def kv_sources(self) -> list:
        """This replica's ranks as KV sources (KVEndpoint each), made once."""
        if self._kv_sources is None:
            self._kv_sources = self.executor.kv_endpoints()
        return self._kv_sources

    def add_handoff(self, h) -> None:
        """Decode side: take a prefill replica's request (messages.Handoff) to pull and go on with."""
        sub = h.submit
        params = sub.sampling_params
        if not params._eos_token_ids:
            params = params.clone(_eos_token_ids=tuple(self.model_config.eos_token_ids))
        req = Request(request_id=sub.request_id, prompt_token_ids=list(sub.prompt_token_ids), sampling_params=params,
                      eos_token_ids=params._eos_token_ids, cache_extra_keys=sub.cache_extra_keys)
        req.output_token_ids.append(h.first_token)
        req.all_token_ids.append(h.first_token)
        req.grammar = self.grammar_state(params, [h.first_token])  # rebuilt here: the first token is in
        if h.first_logprobs is not None:
            req.output_logprobs.append(h.first_logprobs)
        req.num_cached_tokens = h.num_cached_tokens
        req.remote, req.since = h, time.monotonic()
        self.scheduler.add_remote(req)

    def _start_pulls(self) -> None:
        new, self.scheduler.new_pulls = self.scheduler.new_pulls, []
        pulls, ids = [], []
        for req, src, dst in new:
            if src:
                pulls.append(KVPull(req.request_id, req.remote.sources, src, dst))
                ids.append(req.request_id)
            else:  # every block was a local prefix hit: nothing to move
                self._ready_pulls.append((req.request_id, []))
        if pulls:
            self._pulls.append((self.executor.kv_pull(pulls), ids))

    @property
    def transfers_in_flight(self) -> bool:
        return bool(self._pulls or self._ready_pulls)

    def poll_pulls(self) -> list[tuple[str, Request, list]]:
        """Pulls that returned: (outcome, request, records) with outcome "ready" (queued
        to decode), "aborted" or "failed" (ended and freed; see Scheduler.kv_received)."""
        if not self._pulls and not self._ready_pulls:
            return []
        done, self._ready_pulls = list(self._ready_pulls), []
        still = []
        for handle, ids in self._pulls:
            try:
                per_rank = self.executor.kv_poll(handle)
            except Exception as e:  # a worker died under the pull: every request in it failed
                err = f"{type(e).__name__}: {e}"
                done.extend((rid, [KVTransferRecord(rid, "", 0, 0, 0.0, err)]) for rid in ids)
                continue
            if per_rank is None:
                still.append((handle, ids))
                continue
            by_rid: dict[str, list] = {rid: [] for rid in ids}
            for records in per_rank:
                for r in records:
                    by_rid[r.request_id].append(r)
            done.extend(by_rid.items())
        self._pulls = still
        out = []
        for rid, records in done:
            ok = all(r.error is None for r in records)
            res = self.scheduler.kv_received(rid, ok)
            if res is not None:
                out.append((res[0], res[1], records))
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._inflight is not None

    def step(self) -> StepUpdates:
        """One step, with the next one already scheduled and submitted before
        this one's tokens are awaited (async scheduling): the workers never
        wait for the scheduler. Requests sampling in a running step count its
        token as pending; see Scheduler."""
        sec = self.seconds
        try:
            if self._inflight is None:
                self._inflight = self._plan()
                if self._inflight is None:
                    return StepUpdates()
                self._send_masks(*self._inflight)
            step, handle = self._inflight
            self._inflight = nxt = self._plan() if self.async_scheduling else None
            t = time.perf_counter()
            out = self.executor.wait(handle)
            sec["wait"] += time.perf_counter() - t
        except BaseException as e:
            raise self._failed(e) from e
        if self.scheduler.step_cost is not None:
            self._timed(step.step_id)
        t = time.perf_counter()
        updates = self.scheduler.update_from_output(step, out)
        sec["update"] += time.perf_counter() - t
        if nxt is not None:
            # Deferred sampling: the GPU runs nxt's forward while its masks are filled
            # from the grammars that just accepted this step's tokens.
            try:
                self._send_masks(*nxt)
            except BaseException as e:
                raise self._failed(e) from e
        return updates

    def _timed(self, step_id: int) -> None:
        done = self.clock()
        launched = self._launched.pop(step_id, None)
        if launched is not None:
            self.scheduler.step_timed(step_id, done - max(launched, self._last_done))
        self._last_done = done
        if len(self._launched) > 8:  # steps dropped without a wait
            self._launched = {k: v for k, v in self._launched.items() if k > step_id}

    def _failed(self, e: BaseException) -> StepFailed:
        """After a failed step: every request ended, the prefix cache forgotten."""
        # Blocks entered in the prefix cache when these steps were scheduled
        # may never have been written: end every request and forget all
        # cached prefixes, so nothing can ever read that KV.
        self._inflight = None
        aborted = self.abort(list(self.scheduler.requests), force=True)
        # Steps scheduled (or half-scheduled) but never applied, and their
        # row frees, are gone: the next step frees every row in the workers.
        self.scheduler.steps_abandoned()
        self.kv.reset_prefix_cache()
        return StepFailed(aborted)

    def _send_masks(self, step, handle) -> None:
        """A step launched with deferred sampling gets its grammar masks (now that every
        token before it is accepted) and is sampled."""
        if step.defers_sampling:
            t = time.perf_counter()
            self.executor.sample_async(handle, self.scheduler.masks_for(step))
            self.seconds["masks"] += time.perf_counter() - t

    def _plan(self):
        """Schedule the next step and launch it: (step, executor handle), or None if it is empty."""
        t0 = time.perf_counter()
        step = self.scheduler.schedule()
        if self.scheduler.new_pulls:
            self._start_pulls()
        t1 = time.perf_counter()
        self.seconds["schedule"] += t1 - t0
        loras = self.scheduler.loras
        if step.is_empty and not step.lora_prefetch:
            if loras is None or not loras.prefetching:
                self.scheduler.step_dropped(step)
                return None
            time.sleep(0.001)  # nothing runs: an empty step only asks whether the adapter reads are done
        if self._fault_file is not None and os.path.exists(self._fault_file):
            os.remove(self._fault_file)  # one shot: the replica's next incarnation runs clean
            step.inject_fault = True
        handle = self.executor.execute_async(step)
        self.seconds["launch"] += time.perf_counter() - t1
        if self.scheduler.step_cost is not None:
            self._launched[step.step_id] = self.clock()
        return step, handle

    def shutdown(self) -> None:
        """Release the workers (and with them the model and KV cache). Idempotent."""
        self._inflight = None  # its handle holds device tensors
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown()
