"""WorkerActor: one GPU (or CPU process) = one TP rank, a thin shell around Worker.

Created by the launcher inside the replica's placement group; the scheduler
calls setup/determine_num_blocks/initialize_cache once, then drives
`execute` every step through a compiled graph.
"""

from __future__ import annotations

import socket

import ray

from ziggurat.config import EngineConfig
from ziggurat.actors.process import configure_logging, freeze_startup_heap, load_object


@ray.remote(concurrency_groups={"kv": 1, "kv_serve": 1, "health": 1})
class WorkerActor:
    def __init__(self, config: EngineConfig, rank: int, worker_cls: str = "ziggurat.models.worker:Worker"):
        configure_logging()
        self.config, self.rank, self.worker_cls = config, rank, worker_cls
        self.worker = None
        self._prev = None  # the last step launched by execute_pipelined, not yet answered
        self._prev_deferred = False  # and whether its sampling waits for the next call's masks

    def address(self) -> str:
        """A TCP rendezvous address on this node, for rank 0."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def setup(self, init_method: str, max_model_len: int) -> dict:
        cls = load_object(self.worker_cls)
        self.worker = cls(self.config, self.rank, init_method, max_model_len)
        return {"rank": self.rank, "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids()}

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)
        freeze_startup_heap()  # the model and cache bookkeeping live as long as this actor

    def execute_pipelined(self, step):
        """Launch `step` and return the previous call's output (None on the
        first call): the GPU runs this step while that output goes back. See
        CompiledGraphExecutor. A previous step launched with deferred sampling
        is sampled first, under the masks this step carries (step.prev_masks)."""
        try:
            if self._prev is not None and self._prev_deferred:
                self.worker.sample_deferred(self._prev, step.prev_masks)
            handle = self.worker.execute_async(step)
            self._prev_deferred = step.defers_sampling
            prev, self._prev = self._prev, handle
            return None if prev is None else self.worker.wait(prev)
        except BaseException:
            self._prev, self._prev_deferred = None, False  # the engine aborts everything on a failed step; start afresh
            raise

    # -- KV transfer between replicas (models/kv_transfer.py), beside the step graph ---------

    @ray.method(concurrency_group="kv")
    def kv_endpoint(self):
        return self.worker.kv_endpoint(ray.get_runtime_context().current_actor)

    @ray.method(concurrency_group="kv")
    def kv_pull(self, pulls):
        side = self.worker._kv_side()
        if side.request_pair is None:
            side.request_pair = _request_pair
        return self.worker.kv_pull(pulls)

    @ray.method(concurrency_group="kv")
    def kv_warmup(self) -> None:
        self.worker.kv_warmup()

    @ray.method(concurrency_group="kv_serve")
    def kv_serve(self, pair_id: str, backend: str) -> None:
        self.worker.kv_serve(pair_id, backend)

    @ray.method(concurrency_group="health")
    def gpu_poll(self) -> tuple[list[str], dict]:
        """New GPU problems (XID, ECC, fallen off the bus) and a telemetry reading (topology/gpu_health.py)."""
        if self.worker is None or self.worker.device.type != "cuda":
            return [], {}
        if getattr(self, "_monitor", None) is None:
            from ziggurat.topology.gpu_health import GpuMonitor

            self._monitor = GpuMonitor(self.worker.device.index or 0)
        return self._monitor.poll()

    def gpu_info(self) -> dict:
        from ziggurat.topology.gpus import local_gpu_info

        return local_gpu_info()


def _request_pair(src, pair_id: str, backend: str) -> None:
    """Ask a source worker to join a pair group with us (it serves pulls on a thread)."""
    ray.get(src.worker.kv_serve.remote(pair_id, backend), timeout=30)
