"""SchedulerActor: one per replica, a thin Ray shell around SchedulerLoop (loop.py).

It owns the replica's engine core, drives its TP worker group through a Ray
compiled graph (compiled_graph.py) and runs these threads:

    scheduler-N   SchedulerLoop.run_once, forever: inbox -> engine.step() -> TokenBatches
    tokens-N      sends queued TokenBatches to their ingresses (a step never waits on Ray)
    usage-N       delivers usage events to the Meter until acknowledged
    kv-N          sends KV events (prefix-cache blocks stored/evicted) to every router,
                  fire and forget; an answer asking for a snapshot is read on its next pass

Actor methods (submit, abort, register_ingress, stats) only validate and
enqueue; replica stats go to the routers and the Ray dashboard every 0.2 s
(a router's answer "send a snapshot", for a replica idle since that router
started, is read on the next report).

Prefill/decode: hand-offs to a decode replica and their answers travel on a
small thread pool (`RayPeers`), releases are fire-and-forget; the decode
side's accept_handoff / the prefill side's release_handoff only enqueue.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ray

from ziggurat.actors.metrics import RayExporter
from ziggurat.actors.process import GCPauses, configure_logging, freeze_startup_heap
from ziggurat.actors.tracing import Tracing
from ziggurat.actors.scheduler.compiled_graph import CompiledGraphExecutor
from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.loop import SchedulerLoop
from ziggurat.actors.scheduler.messages import (
    Handoff,
    HandoffResult,
    KVEvents,
    Registration,
    ReplicaHealth,
    ReplicaInfo,
    ReplicaStats,
    SubmitRequest,
    SubmitResult,
    TokenBatch,
)
from ziggurat.config import EngineConfig

log = logging.getLogger("ziggurat.scheduler")


class RayPeers:
    """The other replicas' schedulers, by replica index (actor names: a rebuilt
    replica is a new actor under the same name)."""

    def __init__(self, names: list[str], loop: SchedulerLoop | None = None, timeout_s: float = 10.0):
        self.names, self.loop, self.timeout_s = list(names), loop, timeout_s
        self._handles: dict[int, object] = {}
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="handoff")

    def _handle(self, replica: int):
        h = self._handles.get(replica)
        if h is None:
            h = self._handles[replica] = ray.get_actor(self.names[replica])
        return h

    def handoff(self, replica: int, h: Handoff) -> None:
        self._pool.submit(self._handoff, replica, h)

    def _handoff(self, replica: int, h: Handoff) -> None:
        try:
            res = ray.get(self._handle(replica).accept_handoff.remote(h), timeout=self.timeout_s)
        except Exception as e:  # dead, restarting or wedged: the prefill side keeps the request
            self._handles.pop(replica, None)
            res = HandoffResult(False, f"unavailable ({type(e).__name__})")
        self.loop.handoff_result(h.submit.request_id, res)

    def release(self, replica: int, request_id: str) -> None:
        try:
            self._handle(replica).release_handoff.remote(request_id)
        except Exception:  # gone: its blocks went with it (or its deadline frees them)
            self._handles.pop(replica, None)

    def forget(self, replica: int) -> None:
        self._handles.pop(replica, None)


@ray.remote(max_concurrency=8)
class SchedulerActor:
    def __init__(self, config: EngineConfig, workers: list, replica: int, router=None, max_waiting: int | None = None,
                 meter=None, journal: str | None = None, role: str = "mixed", peer_names: list[str] | None = None,
                 model_name: str = ""):
        configure_logging()
        gpu = ray.get(workers[0].gpu_info.remote())
        self.engine = EngineCore(config, executor_factory=lambda cfg, n: CompiledGraphExecutor(workers, cfg, n))
        self.ingresses: dict[str, object] = {}
        # router: one handle or several (every router gets the stats and KV events).
        self.routers = list(router) if isinstance(router, (list, tuple)) else [router] if router is not None else []
        self.meter, self.model_name = meter, model_name
        gpu_type = gpu["name"] if config.device != "cpu" and gpu["count"] else "cpu"
        self.peers = RayPeers(peer_names) if peer_names else None
        self.tracing = Tracing(config.otlp_traces_endpoint, f"ziggurat-scheduler-{replica}")
        self.loop = SchedulerLoop(self.engine, replica, self._send, max_waiting or 4 * config.max_num_seqs, gpu_type,
                                  journal, self.peers, role, self.tracing)
        if self.peers is not None:
            self.peers.loop = self.loop
            if role in ("prefill", "mixed"):
                self.engine.kv_sources()  # export the cache once, before any hand-off waits on it
            if role in ("decode", "mixed"):
                self.engine.executor.kv_warmup()  # compile the copy kernel before the first pull waits on it
        if self.loop.usage.outbox:
            log.warning("replica %d: %d usage events of a predecessor recovered from %s", replica,
                        len(self.loop.usage.outbox), journal)
        freeze_startup_heap()  # the block pool alone is num_blocks objects; a full collection would walk them all
        self.loop.gc = GCPauses()
        self._stop = False
        self.failed = False
        # TokenBatches leave through their own thread, in order: the loop only
        # queues them, so a step never waits on Ray's task submission.
        self._outq: collections.deque = collections.deque()
        self._sender_stop = False
        self._out_cv = threading.Condition()
        self._sender = threading.Thread(target=self._send_loop, name=f"tokens-{replica}", daemon=True)
        self._sender.start()
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{replica}", daemon=True)
        self._thread.start()
        self._flusher = threading.Thread(target=self._flush_usage, name=f"usage-{replica}", daemon=True)
        self._flusher.start()
        self._kvq: collections.deque = collections.deque()
        self._kv_cv = threading.Condition()
        if self.routers:
            self.loop.publish_kv_events(self._queue_kv_events)
            threading.Thread(target=self._send_kv_events, name=f"kv-{replica}", daemon=True).start()
        self.workers = workers
        self.gpu_problems: list[str] = []
        if config.device != "cpu":
            threading.Thread(target=self._watch_gpus, name=f"gpus-{replica}", daemon=True).start()

    def _flush_usage(self) -> None:
        """Deliver usage events to the Meter until each batch is acknowledged.
        A dead or restarting Meter just means retrying; duplicates are ignored
        by the ledger, so a retry after a lost acknowledgement is harmless."""
        while not self._stop or self.loop.usage.outbox:
            batch = self.loop.usage.take()
            if not batch or self.meter is None:
                if self._stop:
                    return
                time.sleep(0.05)
                continue
            try:
                ray.get(self.meter.record.remote(batch), timeout=30)
                self.loop.usage.ack(len(batch))
            except Exception as e:  # Meter restarting, unreachable, timed out
                log.warning("usage delivery failed (%s); retrying", type(e).__name__)
                time.sleep(0.2)
                if self._stop and time.monotonic() > self._stop_deadline:
                    return

    def _queue_kv_events(self, ev: KVEvents) -> None:
        with self._kv_cv:
            if len(self._kvq) >= 1024:  # the sender is stuck: what is queued is moot, a snapshot says it all
                self._kvq.clear()
                self.loop.request_kv_snapshot()
            self._kvq.append(ev)
            self._kv_cv.notify()

    def _send_kv_events(self) -> None:
        """Every router gets every KVEvents, in order (one call per router per pass).
        A router's answer (True: send a snapshot) is read on the next pass."""
        answers: list = []
        while not self._stop:
            with self._kv_cv:
                while not self._kvq and not self._stop:
                    self._kv_cv.wait(0.1)
                batch = list(self._kvq)
                self._kvq.clear()
            answers = self._router_answers(answers)
            if not batch:
                continue
            for r in self.routers:
                try:
                    answers.append(r.kv_events.remote(batch))
                except Exception as e:
                    log.warning("KV events not sent to a router: %s", type(e).__name__)

    def _watch_gpus(self) -> None:
        """Every 2 s: the workers' GPU problems (they end this replica's health) and telemetry."""
        while not self._stop:
            try:
                polls = ray.get([w.gpu_poll.remote() for w in self.workers], timeout=10)
                for problems, _ in polls:
                    for p in problems:
                        log.error("replica %d: %s", self.loop.replica, p)
                        self.gpu_problems.append(p)
                self.loop.gpu_telemetry = [dict(t, rank=r) for r, (_, t) in enumerate(polls)]
            except Exception:  # a worker gone: the step path and the health check see to it
                pass
            time.sleep(2.0)

    def _send(self, ingress_id: str, batch: TokenBatch) -> None:
        with self._out_cv:
            self._outq.append((ingress_id, batch))
            self._out_cv.notify()

    def _send_loop(self) -> None:
        while True:
            with self._out_cv:
                while not self._outq and not self._sender_stop:
                    self._out_cv.wait(0.1)
                if not self._outq:
                    return  # stopping, and everything went out
                items = list(self._outq)
                self._outq.clear()
            # One call per ingress per pass: the steps queued while the last
            # pass was sending travel together (a call costs more than a step's tokens).
            per_ingress: dict[str, list[TokenBatch]] = {}
            for ingress_id, batch in items:
                per_ingress.setdefault(ingress_id, []).append(batch)
            for ingress_id, batches in per_ingress.items():
                try:
                    handle = self.ingresses.get(ingress_id)
                    if handle is None:
                        handle = self.ingresses[ingress_id] = ray.get_actor(ingress_id)
                    handle.push_tokens.remote(batches)  # fire and forget
                except Exception as e:  # an ingress gone for good: its streams are aborted on re-registration
                    log.warning("tokens for ingress %s not delivered: %s", ingress_id, type(e).__name__)

    def _router_answers(self, refs: list) -> list:
        """The routers' answers to earlier reports or KV events, read without waiting: one
        that does not mirror this replica's cache (new, restarted; an idle replica sends no
        KV events that would show it a gap) gets a snapshot. Returns the unanswered ones
        (bounded: answers to old passes no longer matter)."""
        if not refs:
            return refs
        done, refs = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            try:
                if ray.get(ref):
                    self.loop.request_kv_snapshot()
            except Exception:  # that router is restarting: it asks again once it is back
                pass
        return refs[-4 * len(self.routers):]

    def _run(self) -> None:
        last_report, reports = 0.0, []
        metrics = RayExporter(self.loop.replica, self.model_name)
        while not self._stop:
            try:
                self.loop.run_once()
            except Exception as e:
                # A worker failed (OOM, NCCL...): answer and meter every live
                # request, refuse new ones, and let the router route around us.
                log.exception("scheduler step failed; replica %d is out of service", self.loop.replica)
                self.failed = True
                self.loop.fail_all("error", getattr(e, "requests", ()))
                for r in self.routers:
                    r.mark_unhealthy.remote(self.loop.replica)
                return
            now = time.monotonic()
            if now - last_report > 0.2:
                stats = self.loop.stats()
                reports = self._router_answers(reports)
                reports += [r.report.remote(stats) for r in self.routers]
                metrics.update(stats, self.loop.metrics)
                last_report = now

    def info(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(self.loop.replica, e.config.model, e.max_model_len, e.model_config.vocab_size,
                           e.config.block_size, e.num_blocks, getattr(e.executor, "placement", None),
                           self.loop.incarnation, self.loop.role, max_lora_rank=e.limits.max_lora_rank)

    def register_ingress(self, ingress_id: str, handle, epoch: str = "") -> Registration:
        self.ingresses[ingress_id] = handle
        return self.loop.register_ingress(ingress_id, epoch)

    def health(self) -> ReplicaHealth:
        """For the supervisor: answered from the actor's threads, so a stuck step shows as no progress."""
        return self.loop.health(self.failed, self.gpu_problems)

    def submit(self, req: SubmitRequest) -> SubmitResult:
        if self.failed or self._stop:
            return SubmitResult(False, f"replica {self.loop.replica} is out of service", "unavailable")
        return self.loop.submit(req)

    def submit_batch(self, reqs: list[SubmitRequest]) -> list[SubmitResult]:
        """Several submissions in one call (an ingress sends each event-loop turn's
        together). Each gets its own result: one that fails does not take the
        ones already accepted down with it (they would run with nobody told)."""
        out = []
        for r in reqs:
            try:
                out.append(self.submit(r))
            except Exception as e:
                log.exception("submission %s failed", getattr(r, "request_id", "?"))
                out.append(SubmitResult(False, f"the server could not take the request ({type(e).__name__})",
                                        "internal"))
        return out

    def abort(self, request_ids: list[str], reason: str = "aborted") -> None:
        self.loop.abort(request_ids, reason)

    # -- prefill/decode ----------------------------------------------------------------

    def accept_handoff(self, h: Handoff) -> HandoffResult:
        if self.failed or self._stop:
            return HandoffResult(False, "unavailable")
        return self.loop.accept_handoff(h)

    def release_handoff(self, request_id: str) -> None:
        self.loop.release_handoff(request_id)

    def peer_failed(self, replica: int) -> None:
        if self.peers is not None:
            self.peers.forget(replica)
        self.loop.peer_failed(replica)

    def stats(self) -> ReplicaStats:
        return self.loop.stats()

    def recent_iterations(self) -> list[float]:
        """Durations (s) of the latest busy loop iterations, oldest first (benchmarks)."""
        return list(self.loop.iteration_seconds)

    def shutdown(self) -> None:
        self._stop_deadline = time.monotonic() + 10  # give the Meter a chance at what is left
        self._stop = True
        self._thread.join(timeout=5)
        if not self.failed:
            self.loop.fail_all("aborted")  # requests cut off by shutdown are metered too
        with self._out_cv:
            self._sender_stop = True
            self._out_cv.notify()
        self._sender.join(timeout=5)
        self._flusher.join(timeout=12)
        self.engine.shutdown()
