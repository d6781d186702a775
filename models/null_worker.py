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
        self.state: dict[str, list[int]] = {}  # request id -> [tokens known (prompt + generated), tokens computed]
        self.vocab = 1000

    def determine_num_blocks(self) -> int:
        return self.config.num_kv_blocks or 65536

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def execute(self, step: StepInput) -> StepOutput | None:
        state = self.state
        for rid in step.finished_req_ids:
            state.pop(rid, None)
        for r in step.new_requests:
            state[r.req_id] = [len(r.prompt_token_ids) + len(r.output_token_ids), r.num_computed_tokens]
        for c in step.cached_requests:
            state[c.req_id][1] = c.num_computed_tokens
        out = StepOutput()
        ids, toks = out.req_ids, out.token_ids
        for rid, n in step.num_scheduled_tokens.items():
            st = state[rid]
            st[1] += n
            if st[1] == st[0]:  # every known token computed: "sample" the next one
                st[0] += 1
                ids.append(rid)
                toks.append((hash(rid) + st[0] * 7919) % self.vocab)
        out.logprobs = [None] * len(ids)
        return out if self.rank == 0 else None

    # Nothing runs asynchronously here: the "handle" is the output itself.
    def execute_async(self, step: StepInput):
        return self.execute(step)

    def wait(self, handle) -> StepOutput | None:
        return handle
