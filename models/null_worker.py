"""NullWorker: a zero-cost stand-in for Worker, for control-plane benchmarks.

It keeps the same per-request bookkeeping as ModelRunner (which requests
reach the end of their known tokens this step) and "samples" a pseudo-random
token for each, with no model, no KV cache and no compute. Swapping it in
(`DeploymentSpec(worker_cls="ziggurat.models.null_worker:NullWorker")`)
measures what HTTP -> router -> scheduler -> workers -> HTTP costs by itself.

With `extra={"null_step_us": T}` in the config, every step instead occupies a
simulated device for T microseconds, the way a GPU step does: launching
returns at once, steps run back to back in launch order, and `wait` returns
when the step's simulated end has passed. Then the scheduler's per-step time
minus T is what orchestration adds to a model step of that length.
"""

from __future__ import annotations

import time

import numpy as np

from ziggurat.config import EngineConfig
from ziggurat.models.step import StepInput, StepOutput


class NullWorker:
    def __init__(self, config: EngineConfig, rank: int = 0, init_method: str | None = None, max_model_len: int = 0):
        self.config, self.rank = config, rank
        # Per row: tokens known (prompt + generated) and tokens computed.
        self.known = np.zeros(64, dtype=np.int64)
        self.computed = np.zeros(64, dtype=np.int64)
        self.vocab = 1000
        self.step_s = float(config.extra.get("null_step_us", 0)) / 1e6
        self._free_at = 0.0  # when the simulated device finishes its last launched step

    def determine_num_blocks(self) -> int:
        return self.config.num_kv_blocks or 65536

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def _ensure(self, row: int) -> None:
        if row >= len(self.known):
            n = max(2 * len(self.known), row + 1)
            self.known = np.concatenate([self.known, np.zeros(n - len(self.known), dtype=np.int64)])
            self.computed = np.concatenate([self.computed, np.zeros(n - len(self.computed), dtype=np.int64)])

    def execute(self, step: StepInput) -> StepOutput | None:
        for r in step.new_requests:  # a freed row needs no clearing: its next request overwrites it
            self._ensure(r.row)
            self.known[r.row] = len(r.prompt_token_ids) + len(r.output_token_ids)
            self.computed[r.row] = r.num_computed_tokens
        for c in step.cached_requests:
            self.computed[c.row] = c.num_computed_tokens
        s = step.rows
        if not len(s):
            return StepOutput() if self.rank == 0 else None
        self.computed[s] += step.num_tokens
        done = s[self.computed[s] == self.known[s]]  # every known token computed: "sample" the next one
        self.known[done] += 1
        toks = (done.astype(np.int64) * 7919 + self.known[done] * 31) % self.vocab
        return StepOutput(done, toks.astype(np.int32)) if self.rank == 0 else None

    def execute_async(self, step: StepInput):
        out = self.execute(step)
        if self.step_s <= 0 or step.is_empty:  # an empty step (a pipeline flush) launches nothing
            return out, 0.0
        self._free_at = max(time.perf_counter(), self._free_at) + self.step_s
        return out, self._free_at

    def wait(self, handle) -> StepOutput | None:
        out, ready = handle
        left = ready - time.perf_counter()
        if left > 3e-4:
            time.sleep(left - 2e-4)  # then spin: sleep() overshoots by ~0.1 ms
        while time.perf_counter() < ready:
            pass
        return out
