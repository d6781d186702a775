"""LocalEngineClient: the engine client over one in-process replica, no Ray.

A SchedulerLoop (actors/scheduler/loop.py) runs on a thread of this process
and its TokenBatches come straight back to the event loop. The HTTP app
(server.py) runs on it unchanged, so protocol edge cases are unit-tested
without a cluster; the Ray deployment tests remain the end-to-end layer.
"""

from __future__ import annotations

import threading

from ziggurat.actors.ingress.engine_client import EngineClient, ReplicaDown
from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.loop import SchedulerLoop
from ziggurat.actors.scheduler.messages import ReplicaInfo, ReplicaStats, SubmitRequest, SubmitResult


class LocalEngineClient(EngineClient):
    def __init__(self, engine: EngineCore, ingress_id: str = "local", max_waiting: int | None = None):
        super().__init__(ingress_id, epoch="local")
        self.engine = engine
        self.scheduler = SchedulerLoop(engine, 0, lambda _ingress, batch: self.push_tokens([batch]),
                                   max_waiting or 4 * engine.config.max_num_seqs)
        self.scheduler.register_ingress(ingress_id, self.epoch)
        self.failed: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def info(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(0, e.config.model, e.max_model_len, e.model_config.vocab_size, e.config.block_size, e.num_blocks)

    def start(self) -> None:
        """Start the replica's loop thread (call once the event loop is set)."""
        self._thread = threading.Thread(target=self._run, name="local-scheduler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.scheduler.run_once()
            except Exception as e:  # as the scheduler actor: every live request ends with an error
                self.failed = e
                self.scheduler.fail_all("error", getattr(e, "requests", ()))
                return

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.scheduler.fail_all("aborted")

    async def pick(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0) -> int | None:
        return None if self.failed else 0

    async def submit_batch(self, replica: int, reqs: list[SubmitRequest]) -> list[SubmitResult]:
        if self.failed:
            raise ReplicaDown()
        return [self.scheduler.submit(r) for r in reqs]

    def send_abort(self, replica: int, request_ids: list[str], reason: str) -> None:
        self.scheduler.abort(request_ids, reason)

    async def mark_unhealthy(self, replica: int) -> None:
        pass  # `failed` already keeps it out

    async def healthy(self) -> list[int]:
        return [] if self.failed else [0]

    async def replica_stats(self) -> list[ReplicaStats | BaseException]:
        return [self.scheduler.stats()]
