"""NullWorker: a zero-cost stand-in for Worker, for control-plane benchmarks.

It keeps the same per-request bookkeeping as ModelRunner (which requests
reach the end of their known tokens this step) and "samples" a pseudo-random
token for each, with no model, no KV cache and no compute. Swapping it in
(`DeploymentSpec(worker_cls="ziggurat.models.null_worker:NullWorker")`)
measures what HTTP -> router -> scheduler -> workers -> HTTP costs by itself.
"""

from __future__ import annotations

from ziggurat.config import EngineConfig
from ziggurat.models.step import StepInput, StepOutput


class NullWorker:
    def __init__(self, config: EngineConfig, rank: int = 0, init_method: str | None = None, max_model_len: int = 0):
        self.config, self.rank = config, rank
        self.known: dict[str, int] = {}  # request id -> tokens known (prompt + generated)
        self.computed: dict[str, int] = {}
        self.vocab = 1000

    def determine_num_blocks(self) -> int:
        return self.config.num_kv_blocks or 65536

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def execute(self, step: StepInput) -> StepOutput | None:
        for rid in step.finished_req_ids:
            self.known.pop(rid, None)
            self.computed.pop(rid, None)
        for r in step.new_requests:
            self.known[r.req_id] = len(r.prompt_token_ids) + len(r.output_token_ids)
            self.computed[r.req_id] = r.num_computed_tokens
        for c in step.cached_requests:
            self.computed[c.req_id] = c.num_computed_tokens
        out = StepOutput()
        computed, known = self.computed, self.known
        for rid, n in step.num_scheduled_tokens.items():
            c = computed[rid] = computed[rid] + n
            if c == known[rid]:
                k = known[rid] = c + 1
                out.req_ids.append(rid)
                out.token_ids.append((hash(rid) + k * 7919) % self.vocab)
        out.logprobs = [None] * len(out.req_ids)
        return out if self.rank == 0 else None

    # Nothing runs asynchronously here: the "handle" is the output itself.
    def execute_async(self, step: StepInput):
        return self.execute(step)

    def wait(self, handle) -> StepOutput | None:
        return handle
