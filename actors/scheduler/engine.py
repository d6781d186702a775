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
from ziggurat.actors.scheduler.validation import ModelLimits, check_request
from ziggurat.config import ConfigError, EngineConfig
from ziggurat.models.config import ModelConfig
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
        self.limits = ModelLimits(self.max_model_len, self.model_config.vocab_size)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len), self.kv,
            tuple(self.model_config.eos_token_ids),
        )
        self._ids = itertools.count()
        self._inflight = None  # (StepInput, executor handle) submitted, outputs not yet applied
        # Only worth it when the executor runs a step while the scheduler works.
        self.async_scheduling = config.async_scheduling and getattr(self.executor, "overlaps", True)
        # Failure drills: when this file appears, the next step fails on every rank
        # (extra={"inject_fault_file": path}; tests and scripts/chaos.py use it).
        self._fault_file = config.extra.get("inject_fault_file")
        # Seconds spent in each part of step(), summed (the control-plane benchmark reports them).
        self.seconds = {"schedule": 0.0, "launch": 0.0, "wait": 0.0, "update": 0.0}

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_extra_keys: tuple = (),
        checked: bool = False,
    ) -> str:
        """Queue a request (RequestError if validation.py's rules refuse it).
        checked=True: the caller ran check_request on this engine already (the
        scheduler loop's submit), so it is not run twice."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not checked:
            self.check_request(prompt_token_ids, params)
        if not params._eos_token_ids:
            params = params.clone(_eos_token_ids=tuple(self.model_config.eos_token_ids))
        self.scheduler.add_request(
            Request(
                request_id=rid,
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                eos_token_ids=params._eos_token_ids,
                cache_extra_keys=cache_extra_keys,
            )
        )
        return rid

    def check_request(self, prompt_token_ids, params: SamplingParams, param: str = "prompt") -> None:
        check_request(prompt_token_ids, params, self.limits, param)

    def abort(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[Request]:
        return self.scheduler.finish_requests(request_ids, status)

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
            step, handle = self._inflight
            self._inflight = self._plan() if self.async_scheduling else None
            t = time.perf_counter()
            out = self.executor.wait(handle)
            sec["wait"] += time.perf_counter() - t
        except BaseException as e:
            # Blocks entered in the prefix cache when these steps were scheduled
            # may never have been written: end every request and forget all
            # cached prefixes, so nothing can ever read that KV.
            self._inflight = None
            aborted = self.abort(list(self.scheduler.requests))
            # Steps scheduled (or half-scheduled) but never applied, and their
            # row frees, are gone: the next step frees every row in the workers.
            self.scheduler.steps_abandoned()
            self.kv.reset_prefix_cache()
            raise StepFailed(aborted) from e
        t = time.perf_counter()
        updates = self.scheduler.update_from_output(step, out)
        sec["update"] += time.perf_counter() - t
        return updates

    def _plan(self):
        """Schedule the next step and launch it: (step, executor handle), or None if it is empty."""
        t0 = time.perf_counter()
        step = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.seconds["schedule"] += t1 - t0
        if step.is_empty:
            self.scheduler.step_dropped(step)
            return None
        if self._fault_file is not None and os.path.exists(self._fault_file):
            os.remove(self._fault_file)  # one shot: the replica's next incarnation runs clean
            step.inject_fault = True
        handle = self.executor.execute_async(step)
        self.seconds["launch"] += time.perf_counter() - t1
        return step, handle

    def shutdown(self) -> None:
        self.executor.shutdown()
