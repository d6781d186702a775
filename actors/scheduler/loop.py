"""SchedulerLoop: one replica's serving loop around the engine, drivable without Ray.

The scheduler actor (actor.py) runs `run_once` on a dedicated thread; its
methods only validate and enqueue, so submitting never waits for a step:

    loop:  take new/aborted requests from the inbox       (_drain_inbox)
           updates = engine.step()                         # schedule -> workers -> update
           meter what finished; one TokenBatch per ingress  (_publish)

KV events (for the routers' exact prefix index): once `publish_kv_events` is
called, the loop sends what the prefix cache stored and evicted as KVEvents,
coalesced over at most `interval_s` of steps (at once when it goes idle),
with the queue's length at that moment (a message also goes when only that
changed); the first message, and any asked for with `request_kv_snapshot`
(a router that restarted or saw a gap in `seq`), is a full snapshot.

Metering is usage.py's UsageBook, per-ingress routing and batch numbering is
streams.py's IngressStreams; this module only sequences them.

Prefill/decode (see Scheduler for the states). `peers` carries the messages
between replicas: handoff(decode replica, Handoff) whose HandoffResult comes
back through `handoff_result`, and release(prefill replica, request id).
A request has one owner at a time, which meters it and answers its ingress:
the prefill replica until the decode replica accepts the hand-off, then the
decode replica (whose usage event names both replicas and counts the prefill
side's prefix hit as the cached tokens, once).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid

from ziggurat.actors import metrics
from ziggurat.actors.metrics import Histogram
from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.messages import (
    Handoff,
    KVEvents,
    HandoffResult,
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

KV_EVENTS_INTERVAL_S = 0.01  # KV events go out at most this often while steps run (at once when idle)


class SchedulerLoop:
    def __init__(self, engine: EngineCore, replica: int, send_batch, max_waiting: int, gpu_type: str = "cpu",
                 journal=None, peers=None, role: str = "mixed", tracing=None):
        """send_batch(ingress_id, TokenBatch) takes each step's tokens away (it must not block);
        journal: the usage journal file (usage.py), kept across this replica's rebuilds;
        peers: the other replicas, for prefill/decode hand-offs (None: no hand-offs)."""
        self.engine, self.replica, self.send_batch = engine, replica, send_batch
        self.peers, self.role = peers, role
        self.sent_to: dict[str, int] = {}  # prefill side: request -> decode replica, while held
        self.tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()  # aborted before arriving
        self.transfers = {"count": 0, "failures": 0, "bytes": 0, "seconds": 0.0, "records": 0}
        # The latest completed pulls: (number, backend, blocks, bytes, seconds), for histograms.
        self.recent_transfers: collections.deque = collections.deque(maxlen=256)
        self._next_expiry = 0.0
        self.hist = {"seconds": Histogram(metrics.TRANSFER_SECONDS.buckets),
                     "bytes": Histogram(metrics.TRANSFER_BYTES.buckets),
                     "blocks": Histogram(metrics.TRANSFER_BLOCKS.buckets)}
        self.max_waiting = max_waiting
        self.inbox: collections.deque = collections.deque()
        self.wakeup = threading.Condition()  # guards the inbox and the streams' numbering
        self.incarnation = uuid.uuid4().hex[:12]
        self.metrics = metrics.RequestMetrics()
        self.tracing = tracing
        self.gpu_telemetry: list = []  # per rank, set by the actor from its workers' NVML readings
        self.usage = UsageBook(replica, gpu_type, journal, self.metrics, tracing)
        self._last_token_step: float | None = None
        self.streams = IngressStreams(replica, self.incarnation)
        self.last_progress = time.monotonic()  # when the last step ended (or the loop went idle)
        self.num_pending = 0  # submitted, not yet taken into the engine
        self.pending_tokens = 0  # their prompt tokens
        # KV events (publish_kv_events): where they go, their numbering, a snapshot wanted.
        self.send_kv_events = None
        self.kv_events_interval_s = KV_EVENTS_INTERVAL_S
        self._kv_seq = 0
        self._kv_snapshot = False
        self._kv_next = 0.0
        self._kv_load = (0, 0)  # (waiting, running) as last sent
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
            self.pending_tokens += len(req.prompt_token_ids)
            self.inbox.append(("add", req))
            self.wakeup.notify()
        return SubmitResult(True)

    def accept_handoff(self, h: Handoff) -> HandoffResult:
        """Decode side: take a prefill replica's request (any thread). Refused if its
        client went away first (an abort arrived before it) or the queue is full."""
        rid = h.submit.request_id
        with self.wakeup:
            reason = self.tombstones.pop(rid, None)
            if reason is not None:
                return HandoffResult(False, "aborted:" + reason)
            s = self.engine.scheduler
            if len(s.remote_waiting) + self.num_pending >= self.max_waiting:
                return HandoffResult(False, "queue_full")
            self.num_pending += 1
            self.inbox.append(("handoff", h))
            self.wakeup.notify()
        return HandoffResult(True)

    def handoff_result(self, request_id: str, res: HandoffResult) -> None:
        """Prefill side: the decode replica's answer to a hand-off (any thread)."""
        self._post("handoff_result", (request_id, res))

    def release_handoff(self, request_id: str) -> None:
        """Prefill side: the decode replica has pulled (or will never pull) the KV."""
        self._post("release", request_id)

    def peer_failed(self, replica: int) -> None:
        """Another replica died: free what we hold for it, end what waits on it."""
        self._post("peer_failed", replica)

    def _post(self, kind: str, arg) -> None:
        with self.wakeup:
            self.inbox.append((kind, arg))
            self.wakeup.notify()

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

    def publish_kv_events(self, send, interval_s: float = KV_EVENTS_INTERVAL_S) -> None:
        """From now on, send(KVEvents) (it must not block) with the prefix cache's
        changes; the first message is a snapshot. Call before the loop runs."""
        self.engine.kv.record_events()
        self.send_kv_events, self.kv_events_interval_s = send, interval_s
        self._kv_snapshot = True

    def request_kv_snapshot(self) -> None:
        """The next KVEvents is a full snapshot (any thread)."""
        self._kv_snapshot = True

    def _kv_publish(self, force: bool) -> None:
        """Loop thread: one KVEvents with what changed, if anything did and the interval passed (or force)."""
        send = self.send_kv_events
        if send is None:
            return
        now = time.monotonic()
        if not force and now < self._kv_next:
            return
        kv, s = self.engine.kv, self.engine.scheduler
        load = (s.num_waiting + self.num_pending, s.num_running)
        stored, removed, overflowed = ([], [], False) if self._kv_snapshot else kv.take_events()
        if self._kv_snapshot or overflowed:  # asked for, or events were dropped: a snapshot says it all
            self._kv_snapshot = False
            msg = KVEvents(self.replica, self.incarnation, self._kv_seq, kv.cached_hashes(), [], True)
        elif stored or removed or load != self._kv_load:
            msg = KVEvents(self.replica, self.incarnation, self._kv_seq, stored, removed)
        else:
            return
        msg.num_waiting, msg.num_running, msg.kv_usage = load[0], load[1], kv.usage
        self._kv_load = load
        self._kv_seq += 1
        self._kv_next = now + self.kv_events_interval_s
        send(msg)

    def health(self, failed: bool = False, gpu_errors=()) -> ReplicaHealth:
        busy = self.engine.has_unfinished() or bool(self.inbox)
        return ReplicaHealth(self.replica, self.incarnation, failed, busy,
                             time.monotonic() - self.last_progress if busy else 0.0, tuple(gpu_errors))

    # -- the loop thread -----------------------------------------------------------------

    def run_once(self, idle_timeout: float = 0.05) -> int:
        """One loop iteration; returns the number of updates sent."""
        e = self.engine
        with self.wakeup:
            if not self.inbox and not e.has_unfinished():
                self.last_progress = time.monotonic()
                # KV pulls in flight are polled often: their requests decode from the next step.
                self.wakeup.wait(0.0005 if e.transfers_in_flight else idle_timeout)
            t0 = time.perf_counter()
            self._drain_inbox()
        if e.transfers_in_flight:
            self._finish_pulls()
        if (e.scheduler.sending or e.scheduler.remote_waiting) and time.monotonic() > self._next_expiry:
            self._expire()
        if not e.has_unfinished():
            self.last_progress = time.monotonic()
            self._kv_publish(force=True)
            return 0
        t1 = time.perf_counter()
        updates = self.engine.step()
        self.step_seconds += time.perf_counter() - t1
        if e.scheduler.admitted:
            now = time.time()
            for rid in e.scheduler.admitted:
                self.usage.scheduled(rid, now)
            e.scheduler.admitted.clear()
        self.steps += 1
        t2 = time.perf_counter()
        self.last_progress = time.monotonic()
        self._publish(updates)
        self._kv_publish(force=False)
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
                self.pending_tokens -= len(arg.prompt_token_ids)
                self.streams.add(arg.request_id, arg.ingress_id)
                self.usage.start(arg)
                try:
                    self.engine.add_request(arg.prompt_token_ids, arg.sampling_params, arg.request_id,
                                            arg.cache_extra_keys, checked=True,  # submit() checked it
                                            handoff=arg.decode_replica is not None and self.peers is not None)
                except (RequestError, ValueError) as e:  # raced past validation (e.g. a duplicate id)
                    log.warning("request %s rejected: %s", arg.request_id, e)
                    self._fail([arg.request_id], {arg.request_id: (len(arg.prompt_token_ids), 0, 0)})
            elif kind == "abort":
                ids, reason = arg
                status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_ABORTED
                known = self.engine.scheduler.requests
                for rid in ids:  # a hand-off still on its way here is refused when it comes
                    if rid not in known and rid not in self.usage.open:
                        self._tombstone(rid, reason)
                for req in self.engine.abort(ids, status, reason):
                    self._ended(req, reason)
            elif kind == "handoff":
                self.num_pending -= 1
                self._take_handoff(arg)
            elif kind == "handoff_result":
                self._handoff_answered(*arg)
            elif kind == "release":
                self.sent_to.pop(arg, None)
                self.engine.scheduler.release_sent(arg)
            elif kind == "peer_failed":
                self._peer_failed(arg)

    def _ended(self, req, reason: str) -> None:
        """Meter a request ended from outside (an abort)."""
        self.streams.drop(req.request_id)
        if reason == "refused":  # a sibling of a refused request: its client got an error, not a bill
            self.usage.discard(req.request_id)
            return
        self.usage.close(req.request_id, req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                         req.num_output_tokens, reason)

    def _tombstone(self, rid: str, reason: str) -> None:
        self.tombstones[rid] = reason
        while len(self.tombstones) > 4096:
            self.tombstones.popitem(last=False)

    # -- prefill/decode ------------------------------------------------------------------

    def _send_handoffs(self, rids: list[str], now: float) -> None:
        """Prefill side: these requests' first tokens are out; offer each to its decode replica."""
        s, e = self.engine.scheduler, self.engine
        for rid in rids:
            req, entry = s.sending[rid], self.usage.open.get(rid)
            if entry is None:  # cannot happen: the owner meters; keep nothing we cannot account for
                s.release_sent(rid)
                continue
            decode = entry.submit.decode_replica
            self.sent_to[rid] = decode
            self.peers.handoff(decode, Handoff(
                entry.submit, self.replica, self.incarnation, req.output_token_ids[0],
                req.output_logprobs[0] if req.output_logprobs else None, max(req.num_cached_tokens, 0),
                e.kv.get_block_ids(rid), e.kv_sources(), now, entry.arrived, entry.scheduled))

    def _handoff_answered(self, rid: str, res: HandoffResult) -> None:
        if res.ok:  # the decode replica owns it now: it meters and streams the rest
            self.usage.discard(rid)
            self.streams.drop(rid)
            return
        self.sent_to.pop(rid, None)
        req = self.engine.scheduler.release_sent(rid)  # nobody will read the blocks
        counts = (req.num_prompt_tokens, max(req.num_cached_tokens, 0), 1) if req else (0, 0, 1)
        if res.reason.startswith("aborted:"):  # the client left before the hand-off: meter it as such
            self.streams.drop(rid)
            reason = res.reason.removeprefix("aborted:")
            if reason == "refused":
                self.usage.discard(rid)
            else:
                self.usage.close(rid, *counts, reason)
        else:
            log.warning("hand-off of %s refused (%s)", rid, res.reason)
            self._fail([rid], {rid: counts})

    def _take_handoff(self, h: Handoff) -> None:
        """Decode side: a hand-off accepted; this replica owns the request from now on."""
        sub, rid = h.submit, h.submit.request_id
        self.usage.start(sub, h.prefill_replica, h.first_token_at, h.arrived_at, h.scheduled_at)
        reason = self.tombstones.pop(rid, None)
        if reason is not None:  # its abort came first (and passed accept_handoff's check meanwhile)
            self.peers.release(h.prefill_replica, rid)
            self.usage.close(rid, len(sub.prompt_token_ids), h.num_cached_tokens, 1, reason)
            return
        self.streams.add(rid, sub.ingress_id)
        try:
            self.engine.add_handoff(h)
        except (RequestError, ValueError) as e:
            log.warning("hand-off %s rejected: %s", rid, e)
            self.peers.release(h.prefill_replica, rid)
            self._fail([rid], {rid: (len(sub.prompt_token_ids), h.num_cached_tokens, 1)})

    def _finish_pulls(self) -> None:
        for outcome, req, records in self.engine.poll_pulls():
            rid, h = req.request_id, req.remote
            req.remote = None
            self.peers.release(h.prefill_replica, rid)  # the prefill side frees its blocks now
            t = self.transfers
            for r in records:
                if r.error is None:
                    t["bytes"] += r.bytes
                    t["seconds"] += r.seconds
                    t["records"] += 1
                    self.recent_transfers.append((t["records"], r.backend, r.blocks, r.bytes, r.seconds))
                    self.hist["seconds"].observe(r.seconds, r.backend)
                    self.hist["bytes"].observe(r.bytes, r.backend)
                    self.hist["blocks"].observe(r.blocks, r.backend)
            tr = self.tracing
            if tr is not None and tr.enabled and h.submit.trace:
                end = time.time()
                ok = [r for r in records if r.error is None]
                tr.record("kv_transfer", h.submit.trace, end - max((r.seconds for r in records), default=0.0), end, {
                    "ziggurat.kv.backend": ok[0].backend if ok else None, "ziggurat.kv.blocks":
                    sum(r.blocks for r in ok), "ziggurat.kv.bytes": sum(r.bytes for r in ok),
                    "ziggurat.kv.outcome": outcome, "ziggurat.prefill_replica": h.prefill_replica,
                    "ziggurat.replica": self.replica})
            if outcome == "failed":
                t["failures"] += 1
                log.warning("KV pull of %s from replica %d failed: %s", rid, h.prefill_replica,
                            next((r.error for r in records if r.error), "?"))
                self._fail([rid], {rid: (req.num_prompt_tokens, max(req.num_cached_tokens, 0), req.num_output_tokens)})
                continue
            t["count"] += 1
            if outcome == "aborted":
                self._ended(req, req.abort_reason)

    def _expire(self) -> None:
        self._next_expiry = time.monotonic() + 0.5
        late, stale = self.engine.scheduler.expired(time.monotonic(), self.engine.config.kv_transfer_timeout_s)
        for req in late:  # decode side: no room came in time
            self.peers.release(req.remote.prefill_replica, req.request_id)
            log.warning("hand-off %s: no KV room within the deadline", req.request_id)
            self._fail([req.request_id], {req.request_id: (req.num_prompt_tokens, max(req.num_cached_tokens, 0), 1)})
        for req in stale:  # prefill side: the decode replica never released them
            log.warning("hand-off %s: no release from replica %s within the deadline; blocks freed", req.request_id,
                        self.sent_to.get(req.request_id))
            self.sent_to.pop(req.request_id, None)
            if req.request_id in self.usage.open:  # never accepted either: ours to end
                self._fail([req.request_id], {req.request_id: (req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                                                               1)})

    def _peer_failed(self, replica: int) -> None:
        s = self.engine.scheduler
        for rid in [r for r, d in self.sent_to.items() if d == replica]:  # held for it: nobody will read them
            self.sent_to.pop(rid)
            req = s.release_sent(rid)
            if req is not None and rid in self.usage.open:  # its hand-off was never accepted
                self._fail([rid], {rid: (req.num_prompt_tokens, max(req.num_cached_tokens, 0), 1)})
        waiting = [r.request_id for r in s.remote_waiting if r.remote.prefill_replica == replica]
        for req in self.engine.abort(waiting):  # their KV source is gone
            self._fail([req.request_id], {req.request_id: (req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                                                           req.num_output_tokens)})

    def _publish(self, updates: StepUpdates) -> None:
        """Meter finished requests and send one TokenBatch per ingress (the
        step's columns split by ingress; RequestUpdate objects are built by
        the ingress that reads them)."""
        ids = updates.request_ids
        if not ids:
            return
        now = time.time()
        self.generation_tokens += len(ids) - updates.token_ids.count(-1)  # -1: an update without a token
        decoding = False
        for rid, o in zip(ids, updates.num_output_tokens):
            if o == 1:  # first token: time to first token for metering
                self.usage.first_token(rid, now)
            elif o > 1:
                decoding = True
        if decoding and self._last_token_step is not None:  # a request mid-decode: no idle gap in between
            self.metrics.observe(metrics.ITL, now - self._last_token_step)
        self._last_token_step = now
        with self.wakeup:  # epochs and numbering change under this lock (register_ingress)
            batches: list[tuple[str, TokenBatch]] = self.streams.split(updates, now)
            for rid, (reason, _) in updates.finished.items():
                self.streams.drop(rid)
                i = ids.index(rid)
                p, c, o = updates.num_prompt_tokens[i], updates.num_cached_tokens[i], updates.num_output_tokens[i]
                self.prompt_tokens += p
                self.cached_tokens += c
                self.usage.close(rid, p, c, o, reason)
        for ingress, batch in batches:
            self.send_batch(ingress, batch)
        if updates.handoffs and self.peers is not None:
            self._send_handoffs(updates.handoffs, now)

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
        for req in list(aborted) + self.engine.abort(list(self.engine.scheduler.requests), force=True):
            if req.request_id in self.usage.open:  # not one handed off to a decode replica (it owns that one)
                counts[req.request_id] = (req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                                          req.num_output_tokens)
        for rid, entry in list(self.usage.open.items()):
            counts.setdefault(rid, (len(entry.submit.prompt_token_ids), 0, 0))
        self.sent_to.clear()  # force-aborted above; our decode peers' pulls from us fail or finish
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
            # list() copies the deque in one C call: safe against the loop thread appending.
            num_waiting_tokens=self.pending_tokens + sum(r.num_tokens - r.num_computed_tokens
                                                         for r in list(s.waiting)),
            adapters=self.engine.resident_adapters(),
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
            role=self.role,
            num_sending=len(s.sending),
            num_receiving=len(s.remote_waiting) + len(s.receiving),
            kv_transfers=self.transfers["count"],
            kv_transfer_failures=self.transfers["failures"],
            kv_transfer_bytes=self.transfers["bytes"],
            kv_transfer_seconds=self.transfers["seconds"],
            recent_transfers=list(self.recent_transfers),
            gpus=list(self.gpu_telemetry),
            finished=dict(self.metrics.finished),
            request_hist=self.metrics.snapshot(),
            kv_transfer_seconds_hist=self.hist["seconds"].snapshot(),
            kv_transfer_bytes_hist=self.hist["bytes"].snapshot(),
            kv_transfer_blocks_hist=self.hist["blocks"].snapshot(),
        )
