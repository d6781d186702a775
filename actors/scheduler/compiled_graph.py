"""CompiledGraphExecutor: the engine's executor over Ray worker actors.

The Ray-backed sibling of executor.py's InProcessExecutor and
MultiprocExecutor (same four calls: determine_num_blocks, initialize_cache,
execute_async, wait), used by the scheduler actor. A plain actor call costs
~1 ms, a compiled-graph step ~150 us, so every step goes through one
compiled graph fanning out to all TP ranks.
"""

from __future__ import annotations

import collections

import ray

from ziggurat.config import EngineConfig
from ziggurat.models.step import StepInput


class CompiledGraphExecutor:
    """The engine's executor over Ray worker actors: setup with plain calls,
    then every step through one compiled graph fanning out to all ranks.

    Pipelined: a worker launches each step on the GPU and answers with the
    previous step's output (WorkerActor.execute_pipelined), so while step N+1
    runs, N's tokens travel back and the scheduler plans N+2. Call k's reply
    therefore carries step k-1's output; waiting for the last step submitted
    sends an empty step to flush it out."""

    overlaps = True
    # Deferred sampling: a step's grammar masks ride on the next call (StepInput.prev_masks),
    # which the worker applies before launching that call's step (WorkerActor.execute_pipelined).
    defers_sampling = True

    def __init__(self, workers: list, config: EngineConfig, max_model_len: int):
        from ray.dag import InputNode, MultiOutputNode

        self.workers = workers
        init_method = ray.get(workers[0].address.remote())
        self.placement = ray.get([w.setup.remote(init_method, max_model_len) for w in workers])
        self._num_blocks = min(ray.get([w.determine_num_blocks.remote() for w in workers]))
        with InputNode() as step:
            dag = MultiOutputNode([w.execute_pipelined.bind(step) for w in workers])
        self._dag_def = dag
        self.dag = None
        self._refs: collections.deque = collections.deque()  # replies not read yet, in call order
        self._submitted = 0  # calls made
        self._read = 0  # replies read
        self._outputs: dict[int, object] = {}  # call number -> its step's output, once a later reply brought it
        self._masks = None  # the last call's deferred grammar masks, sent with the next call

    def determine_num_blocks(self) -> int:
        return self._num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        ray.get([w.initialize_cache.remote(num_blocks) for w in self.workers])
        self.dag = self._dag_def.experimental_compile()

    def sample_async(self, call: int, masks) -> None:
        """The masks of `call` (the last step submitted, launched with deferred sampling):
        they go with the next call, a step or a flush."""
        if call != self._submitted - 1:
            raise RuntimeError(f"deferred masks for call {call}, but the last call is {self._submitted - 1}")
        self._masks = masks

    def execute_async(self, step) -> int:
        masks, self._masks = self._masks, None
        if masks is not None:
            step.prev_masks = masks
        self._refs.append(self.dag.execute(step))  # returns at once; the workers run steps in order
        self._submitted += 1
        return self._submitted - 1

    def wait(self, call: int):
        while self._read <= call + 1:  # step `call`'s output rides on reply `call + 1`
            if self._read == self._submitted:
                self.execute_async(StepInput())  # flush: runs nothing, brings back the last step's output
            ref = self._refs.popleft()
            self._read += 1
            out = ray.get(ref)[0]  # rank 0 returns the tokens
            if self._read >= 2:
                self._outputs[self._read - 2] = out
        for stale in [k for k in self._outputs if k < call]:  # flushes and steps the engine dropped
            del self._outputs[stale]
        return self._outputs.pop(call)

    # KV transfer between replicas: plain calls in the workers' "kv" group, beside the graph.
    def kv_endpoints(self) -> list:
        return ray.get([w.kv_endpoint.remote() for w in self.workers])

    def kv_warmup(self) -> None:
        ray.get([w.kv_warmup.remote() for w in self.workers])

    def kv_pull(self, pulls) -> list:
        return [w.kv_pull.remote(pulls) for w in self.workers]

    def kv_poll(self, refs) -> list | None:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return ray.get(refs) if len(ready) == len(refs) else None

    def shutdown(self) -> None:
        if self.dag is not None:
            self.dag.teardown()
            self.dag = None
