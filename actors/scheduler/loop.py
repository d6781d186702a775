"""SchedulerLoop: one replica's serving loop around the engine, drivable without Ray.

The scheduler actor (actor.py) runs `run_once` on a dedicated thread; its
methods only validate and enqueue, so submitting never waits for a step:

    loop:  take new/aborted requests from the inbox       (_drain_inbox)
           updates = engine.step()                         # schedule -> workers -> update
           meter what finished; one TokenBatch per ingress  (_publish)

Metering is usage.py's UsageBook, per-ingress routing and batch numbering is
streams.py's IngressStreams; this module only sequences them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid

from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.messages import (
    Registration,
    ReplicaHealth,
    ReplicaStats,
    RequestUpdate,
    StepUpdates,
    SubmitRequest,
    SubmitResult,
    TokenBatch,
)
from ziggurat.actors.scheduler.request import RequestStatus
from ziggurat.actors.scheduler.streams import IngressStreams
from ziggurat.actors.scheduler.usage import UsageBook
from ziggurat.actors.scheduler.validation import RequestError

log = logging.getLogger("ziggurat.scheduler")


class SchedulerLoop:
    def __init__(self, engine: EngineCore, replica: int, send_batch, max_waiting: int, gpu_type: str = "cpu",
                 journal=None):
        """send_batch(ingress_id, TokenBatch) takes each step's tokens away (it must not block);
        journal: the usage journal file (usage.py), kept across this replica's rebuilds."""
        self.engine, self.replica, self.send_batch = engine, replica, send_batch
        self.max_waiting = max_waiting
        self.inbox: collections.deque = collections.deque()
        self.wakeup = threading.Condition()  # guards the inbox and the streams' numbering
        self.incarnation = uuid.uuid4().hex[:12]
        self.usage = UsageBook(replica, gpu_type, journal)
        self.streams = IngressStreams(replica, self.incarnation)
        self.last_progress = time.monotonic()  # when the last step ended (or the loop went idle)
        self.num_pending = 0  # submitted, not yet taken into the engine
        # Counters for ReplicaStats.
        self.steps = 0
        self.step_seconds = self.busy_seconds = self.publish_seconds = 0.0
        self.prompt_tokens = self.cached_tokens = self.generation_tokens = 0
        self.gc = None  # GCPauses, in the actor
        self.iteration_seconds: collections.deque = collections.deque(maxlen=1 << 16)  # recent busy iterations

    # -- called from actor methods (any thread) ------------------------------------------

    def submit(self, req: SubmitRequest) -> SubmitResult:
        try:
            self.engine.check_request(req.prompt_token_ids, req.sampling_params, req.prompt_param)
        except RequestError as e:
            return SubmitResult(False, e.message, e.code, e.param)
        if self.engine.scheduler.num_waiting + self.num_pending >= self.max_waiting:
            return SubmitResult(False, "the server's queue is full; retry later", "queue_full")
        with self.wakeup:
            self.num_pending += 1
            self.inbox.append(("add", req))
            self.wakeup.notify()
        return SubmitResult(True)

    def abort(self, request_ids: list[str], reason: str = "aborted") -> None:
        """reason: the status metered: aborted, client_disconnected, stop (a stop string), error;
        or "refused" (its request was refused as a whole: no usage event)."""
        with self.wakeup:
            self.inbox.append(("abort", (list(request_ids), reason)))
            self.wakeup.notify()

    def register_ingress(self, ingress_id: str, epoch: str) -> Registration:
        """A (re)started ingress numbers its batches afresh; its old streams have no
        reader any more. The answer says where this ingress's numbering stands."""
        with self.wakeup:
            orphans, next_seq = self.streams.register(ingress_id, epoch)
            if orphans:  # the ingress died: a failure on our side (its successor records what clients got)
                self.inbox.append(("abort", (orphans, "error")))
                self.wakeup.notify()
        return Registration(self.replica, self.incarnation, next_seq)

    def health(self, failed: bool = False) -> ReplicaHealth:
        busy = self.engine.has_unfinished() or bool(self.inbox)
        return ReplicaHealth(self.replica, self.incarnation, failed, busy,
                             time.monotonic() - self.last_progress if busy else 0.0)

    # -- the loop thread -----------------------------------------------------------------

    def run_once(self, idle_timeout: float = 0.05) -> int:
        """One loop iteration; returns the number of updates sent."""
        with self.wakeup:
            if not self.inbox and not self.engine.has_unfinished():
                self.last_progress = time.monotonic()
                self.wakeup.wait(idle_timeout)
            t0 = time.perf_counter()
            self._drain_inbox()
        if not self.engine.has_unfinished():
            self.last_progress = time.monotonic()
            return 0
        t1 = time.perf_counter()
        updates = self.engine.step()
        self.step_seconds += time.perf_counter() - t1
        self.steps += 1
        t2 = time.perf_counter()
        self.last_progress = time.monotonic()
        self._publish(updates)
        t3 = time.perf_counter()
        self.publish_seconds += t3 - t2
        self.busy_seconds += t3 - t0
        self.iteration_seconds.append(t3 - t0)
        return len(updates)

    def _drain_inbox(self) -> None:
        while self.inbox:
            kind, arg = self.inbox.popleft()
            if kind == "add":
                self.num_pending -= 1
                self.streams.add(arg.request_id, arg.ingress_id)
                self.usage.start(arg)
                try:
                    self.engine.add_request(arg.prompt_token_ids, arg.sampling_params, arg.request_id,
                                            arg.cache_extra_keys, checked=True)  # submit() checked it
                except (RequestError, ValueError) as e:  # raced past validation (e.g. a duplicate id)
                    log.warning("request %s rejected: %s", arg.request_id, e)
                    self._fail([arg.request_id], {arg.request_id: (len(arg.prompt_token_ids), 0, 0)})
            else:
                ids, reason = arg
                status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_ABORTED
                for req in self.engine.abort(ids, status):
                    self.streams.drop(req.request_id)
                    if reason == "refused":  # a sibling of a refused request: its client got an error, not a bill
                        self.usage.discard(req.request_id)
                        continue
                    self.usage.close(req.request_id, req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                                     req.num_output_tokens, reason)

    def _publish(self, updates: StepUpdates) -> None:
        """Meter finished requests and send one TokenBatch per ingress (the
        step's columns split by ingress; RequestUpdate objects are built by
        the ingress that reads them)."""
        ids = updates.request_ids
        if not ids:
            return
        now = time.time()
        self.generation_tokens += len(ids) - updates.token_ids.count(-1)  # -1: an update without a token
        for rid, o in zip(ids, updates.num_output_tokens):
            if o == 1:  # first token: time to first token for metering
                self.usage.first_token(rid, now)
        with self.wakeup:  # epochs and numbering change under this lock (register_ingress)
            batches: list[tuple[str, TokenBatch]] = self.streams.split(updates)
            for rid, (reason, _) in updates.finished.items():
                self.streams.drop(rid)
                i = ids.index(rid)
                p, c, o = updates.num_prompt_tokens[i], updates.num_cached_tokens[i], updates.num_output_tokens[i]
                self.prompt_tokens += p
                self.cached_tokens += c
                self.usage.close(rid, p, c, o, reason)
        for ingress, batch in batches:
            self.send_batch(ingress, batch)

    def _fail(self, request_ids: list[str], counts: dict[str, tuple[int, int, int]]) -> None:
        """End requests with finish_reason "error": tell their ingress, meter them."""
        ups = StepUpdates()
        for rid in request_ids:
            ups.append(RequestUpdate(rid, [], [], "error", None, *counts[rid]))
        self._publish(ups)

    def fail_all(self, status: str = "error", aborted=()) -> None:
        """The engine cannot go on (a worker failed, or shutdown): end every live
        request, so each still gets its one usage event and its client an answer.
        `aborted`: requests the engine already ended (StepFailed.requests)."""
        with self.wakeup:
            self._drain_inbox()
        counts = {}
        for req in list(aborted) + self.engine.abort(list(self.engine.scheduler.requests)):
            counts[req.request_id] = (req.num_prompt_tokens, max(req.num_cached_tokens, 0), req.num_output_tokens)
        for rid, entry in list(self.usage.open.items()):
            counts.setdefault(rid, (len(entry.submit.prompt_token_ids), 0, 0))
        if status == "error":
            self._fail(list(counts), counts)
        else:
            for rid, (p, c, o) in counts.items():
                self.streams.drop(rid)
                self.usage.close(rid, p, c, o, status)

    def stats(self) -> ReplicaStats:
        s, kv = self.engine.scheduler, self.engine.kv
        return ReplicaStats(
            replica=self.replica,
            num_waiting=s.num_waiting + self.num_pending,
            num_running=s.num_running,
            kv_usage=kv.usage,
            num_free_blocks=kv.num_free_blocks,
            num_blocks=kv.num_blocks,
            num_preemptions=s.num_preemptions,
            steps=self.steps,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            generation_tokens=self.generation_tokens,
            step_seconds_total=self.step_seconds,
            busy_seconds_total=self.busy_seconds,
            phase_seconds={**self.engine.seconds, "publish": self.publish_seconds},
            gc_seconds=list(self.gc.seconds) if self.gc is not None else [],
            gc_collections=list(self.gc.count) if self.gc is not None else [],
            tenant_totals={t: dict(v) for t, v in list(self.usage.tenant_totals.items())},
            unacked_usage_events=len(self.usage.outbox),
        )
