"""LocalEngineClient: the engine client over in-process replicas, no Ray.

Each replica's SchedulerLoop (actors/scheduler/loop.py) runs on a thread of
this process and its TokenBatches come straight back to the event loop. The
HTTP app (server.py) runs on it unchanged, so protocol edge cases are
unit-tested without a cluster; the Ray deployment tests remain the end-to-end
layer. With several engines, a policy.Router in this process routes between
them, fed as the router actor is: each loop's ReplicaStats every
`report_interval_s` and its KVEvents as they come.
"""

from __future__ import annotations

import threading
import time

from ziggurat.actors.ingress.engine_client import EngineClient, ReplicaDown
from ziggurat.actors.router.messages import Route
from ziggurat.actors.router.policy import Router
from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.loop import SchedulerLoop
from ziggurat.actors.scheduler.messages import ReplicaInfo, ReplicaStats, SubmitRequest, SubmitResult


class LocalEngineClient(EngineClient):
    def __init__(self, engine: EngineCore | list[EngineCore], ingress_id: str = "local", max_waiting: int | None = None,
                 router: Router | None = None, report_interval_s: float = 0.2):
        """engine: one replica's engine, or several (then `router` routes between them;
        default: a kv-aware Router)."""
        super().__init__(ingress_id, epoch="local")
        self.engines = list(engine) if isinstance(engine, (list, tuple)) else [engine]
        self.engine = self.engines[0]
        self.schedulers = []
        for r, e in enumerate(self.engines):
            lp = SchedulerLoop(e, r, lambda _ingress, batch: self.push_tokens([batch]),
                               max_waiting or 4 * e.config.max_num_seqs)
            lp.register_ingress(ingress_id, self.epoch)
            self.schedulers.append(lp)
        self.scheduler = self.schedulers[0]
        self.router = router
        if self.router is None and len(self.engines) > 1:
            self.router = Router(len(self.engines), block_size=self.engine.config.block_size)
        self._lock = threading.Lock()  # the router: the loops' threads and the event loop share it
        if self.router is not None:
            for lp in self.schedulers:
                lp.publish_kv_events(self._kv_events)
        self.report_interval_s = report_interval_s
        self.failures: list[BaseException | None] = [None] * len(self.engines)
        self._stop = False
        self._threads: list[threading.Thread] = []

    @property
    def failed(self) -> BaseException | None:
        """What stopped the replica (with several: once every one has stopped)."""
        return self.failures[0] if all(f is not None for f in self.failures) else None

    @property
    def info(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(0, e.config.model, min(x.max_model_len for x in self.engines), e.model_config.vocab_size,
                           e.config.block_size, e.num_blocks, max_lora_rank=e.limits.max_lora_rank)

    def num_replicas(self) -> int:
        return len(self.engines)

    def _kv_events(self, ev) -> None:
        with self._lock:
            want = self.router.kv_events(ev)
        if want:
            self.schedulers[ev.replica].request_kv_snapshot()

    def start(self) -> None:
        """Start the replicas' loop threads (call once the event loop is set)."""
        for r in range(len(self.engines)):
            t = threading.Thread(target=self._run, args=(r,), name=f"local-scheduler-{r}", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, r: int) -> None:
        lp, last_report = self.schedulers[r], 0.0
        while not self._stop:
            try:
                lp.run_once()
            except Exception as e:  # as the scheduler actor: every live request ends with an error
                self.failures[r] = e
                lp.fail_all("error", getattr(e, "requests", ()))
                if self.router is not None:
                    with self._lock:
                        self.router.mark_unhealthy(r)
                return
            now = time.monotonic()
            if self.router is not None and now - last_report > self.report_interval_s:
                stats = lp.stats()
                with self._lock:
                    want = self.router.report(stats)
                if want:  # the router does not mirror this replica's cache (it is idle: no KV events)
                    lp.request_kv_snapshot()
                last_report = now

    def stop(self) -> None:
        self._stop = True
        for t in self._threads:
            t.join(timeout=10)
        for lp in self.schedulers:
            lp.fail_all("aborted")

    async def pick(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0,
                   adapter: str | None = None) -> Route | int | None:
        if self.router is None:
            return None if self.failures[0] else 0
        with self._lock:
            return self.router.route(prefix_hashes, num_prompt_tokens, adapter)

    async def submit_batch(self, replica: int, reqs: list[SubmitRequest]) -> list[SubmitResult]:
        if self.failures[replica]:
            raise ReplicaDown()
        return [self.schedulers[replica].submit(r) for r in reqs]

    def send_abort(self, replica: int, request_ids: list[str], reason: str) -> None:
        self.schedulers[replica].abort(request_ids, reason)

    async def mark_unhealthy(self, replica: int) -> None:
        pass  # `failures` already keeps it out (and told the router)

    async def healthy(self) -> list[int]:
        return [r for r, f in enumerate(self.failures) if f is None]

    async def replica_stats(self) -> list[ReplicaStats | BaseException]:
        return [lp.stats() for lp in self.schedulers]
