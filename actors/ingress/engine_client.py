"""EngineClient: an ingress's side of the token path, whatever carries it.

It picks a replica once per request, submits the request's samples to that
replica's scheduler, receives the scheduler's per-step TokenBatches (applied
strictly in sequence order, per replica and ingress incarnation) and hands
each sample's updates to its request's asyncio queue; aborts go back the
same way.

Submissions made in one turn of the event loop travel to a scheduler as one
call (a burst of arrivals costs the scheduler a few calls, not one each:
every call it serves takes its process's GIL from the step loop).

Prefill/decode: a request routed to a (prefill, decode) pair streams its first
token from the prefill replica and the rest from the decode one, two
independently numbered streams. Updates from the decode side that overtake
the first token are held until it comes (or gap_timeout_s passes); the
request belongs to the prefill replica until the decode side's first update
arrives, and aborts go to both.

The transport is a subclass's: ray_client.py (router and scheduler actors
over Ray) or local_engine.py (one in-process SchedulerLoop, no Ray: the
HTTP app's fast tests run on it).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ziggurat.actors.metrics import TOKEN_DELIVERY, Histogram
from ziggurat.actors.ingress.protocol import APIError, bad
from ziggurat.actors.router.messages import Route
from ziggurat.actors.scheduler.messages import (
    UNKNOWN,
    Registration,
    ReplicaStats,
    RequestUpdate,
    SubmitRequest,
    SubmitResult,
    TokenBatch,
)
from ziggurat.actors.scheduler.output_processor import RequestOutputs


log = logging.getLogger("ziggurat.ingress")


class _Handoff:
    __slots__ = ("prefill", "decode", "first_seen", "held", "since")

    def __init__(self, prefill: int, decode: int):
        self.prefill, self.decode = prefill, decode
        self.first_seen = False
        self.held: list[RequestUpdate] = []  # decode-side updates that came before the first token
        self.since = 0.0


class ReplicaDown(Exception):
    """The chosen replica cannot take requests (dead or out of service): pick another."""


class EngineClient:
    """Routes, submits, aborts and receives tokens for this ingress's requests."""

    def __init__(self, ingress_id: str, epoch: str = ""):
        self.ingress_id, self.epoch = ingress_id, epoch
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop the queues belong to
        self.queues: dict[str, tuple[asyncio.Queue, int]] = {}  # engine request -> (its queue, sample index)
        self.replica_of: dict[str, int] = {}
        self.next_seq: dict[int, int] = {}  # per replica: the next TokenBatch to apply
        self.held: dict[int, dict[int, TokenBatch]] = {}  # batches that arrived early
        self._outgoing: dict[int, list[tuple[SubmitRequest, asyncio.Future]]] = {}  # per replica, this turn's
        self.incarnation: dict[int, str] = {}  # replica -> the scheduler run this ingress registered with
        self._early: list[TokenBatch] = []  # batches that came before the event loop was bound
        self._gap_since: dict[int, float] = {}  # replica -> since when a later batch waits for a missing one
        self.gap_timeout_s = 2.0
        self.gaps_skipped = 0
        self._rr = 0  # round robin, when the router cannot be asked
        self.handoff: dict[str, _Handoff] = {}  # prefill/decode requests not yet streaming from the decode side
        self.tracing = None  # actors/tracing.py Tracing, set by the server
        self.cold_start_timeout_s = 0.0  # >0: a deployment that autoscales from zero (ray_client.py sets it)
        self.cold_waiting = 0  # requests waiting for a replica to start
        self.routes: dict[str, int] = {}  # kind -> count (metrics ROUTES)
        self.delivery = Histogram(TOKEN_DELIVERY.buckets)  # publish -> dispatch of each TokenBatch (seconds)

    # -- the transport: a subclass's ---------------------------------------------------------

    async def pick(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0,
                   adapter: str | None = None) -> Route | int | None:
        """The router's choice (one round trip): by the prompt's block hashes, its length
        and its LoRA adapter (None: the base model)."""
        raise NotImplementedError

    async def submit_batch(self, replica: int, reqs: list[SubmitRequest]) -> list[SubmitResult]:
        """Raises ReplicaDown if the replica is gone."""
        raise NotImplementedError

    def send_abort(self, replica: int, request_ids: list[str], reason: str) -> None:
        raise NotImplementedError

    async def mark_unhealthy(self, replica: int) -> None:
        raise NotImplementedError

    async def healthy(self) -> list[int]:
        raise NotImplementedError

    async def replica_stats(self) -> list[ReplicaStats | BaseException]:
        raise NotImplementedError

    # -- replicas ------------------------------------------------------------------------

    def attached(self, reg: Registration) -> None:
        """This ingress (re)registered with a replica's scheduler: batches from that
        run are numbered from `next_seq`; anything from an earlier run is stale."""
        r = reg.replica
        self.incarnation[r] = reg.incarnation
        self.next_seq[r] = reg.next_seq
        self.held[r] = {}
        self._gap_since.pop(r, None)

    def replica_failed(self, replica: int) -> list[str]:
        """The replica died or failed: every request of ours on it ends now with an
        "error" update (the server retries what streamed nothing, and meters what
        its client received). Returns those requests."""
        ids = [rid for rid, rep in self.replica_of.items() if rep == replica]
        ids += [rid for rid, h in self.handoff.items() if h.decode == replica and rid not in ids]
        for rid in ids:
            self.handoff.pop(rid, None)
            entry = self.queues.get(rid)
            if entry is not None:
                entry[0].put_nowait((entry[1], RequestUpdate(rid, [], [], "error", None, UNKNOWN, UNKNOWN, UNKNOWN)))
            self.replica_of.pop(rid, None)
        self.held.pop(replica, None)
        return ids

    # -- tokens in -----------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the request queues live on; batches that came earlier are applied now."""
        self.loop = loop
        early, self._early = self._early, []
        if early:
            loop.call_soon_threadsafe(self._dispatch, early)

    def push_tokens(self, batches: list[TokenBatch]) -> None:
        """Called from the transport's thread."""
        loop = self.loop
        if loop is None:  # the HTTP server is not up yet: keep them (losing one would stall the sequence)
            self._early.extend(batches)
            return
        loop.call_soon_threadsafe(self._dispatch, batches)

    def check_gaps(self, now: float | None = None) -> None:
        """Last resort against a lost batch: if a later batch has waited for a missing
        one longer than gap_timeout_s, skip to it (the missing batch's requests then
        end by their deadlines). Call periodically on the event loop."""
        now = time.monotonic() if now is None else now
        for rid, h in list(self.handoff.items()):
            if h.held and now - h.since > self.gap_timeout_s:  # the first token never came: go on without it
                log.warning("%s: the first token from replica %d never came", rid, h.prefill)
                self._moved(rid, h)
        for replica, since in list(self._gap_since.items()):
            held = self.held.get(replica)
            if not held:
                self._gap_since.pop(replica, None)
            elif now - since > self.gap_timeout_s:
                first = min(held)
                log.warning("replica %d: token batches %d-%d never came; skipping to %d",
                            replica, self.next_seq.get(replica, 0), first - 1, first)
                self.gaps_skipped += 1
                self.next_seq[replica] = first
                self._gap_since.pop(replica, None)
                self._drain(replica)

    def _dispatch(self, batches: list[TokenBatch]) -> None:
        now = time.time()
        for batch in batches:
            if batch.sent_at:
                self.delivery.observe(max(0.0, now - batch.sent_at))
            self._apply(batch)

    def _apply(self, batch: TokenBatch) -> None:
        # Calls may arrive out of order: apply each replica's batches strictly by sequence number.
        if batch.epoch != self.epoch:
            return  # numbered for an earlier incarnation of this ingress
        replica = batch.replica
        known = self.incarnation.get(replica)
        if known is not None and batch.source != known:
            return  # from a run of the replica that is gone
        self.held.setdefault(replica, {})[batch.seq] = batch
        self._drain(replica)

    def _drain(self, replica: int) -> None:
        held = self.held.get(replica, {})
        expected = self.next_seq.get(replica, 0)
        handoff = self.handoff
        while expected in held:
            for u in held.pop(expected).updates:
                if handoff and u.request_id in handoff:
                    self._handoff_update(replica, u)
                    continue
                entry = self.queues.get(u.request_id)
                if entry is not None:
                    entry[0].put_nowait((entry[1], u))
            expected += 1
        self.next_seq[replica] = expected
        if held:
            self._gap_since.setdefault(replica, time.monotonic())
        else:
            self._gap_since.pop(replica, None)

    def _deliver_update(self, u: RequestUpdate) -> None:
        entry = self.queues.get(u.request_id)
        if entry is not None:
            entry[0].put_nowait((entry[1], u))

    def _handoff_update(self, replica: int, u: RequestUpdate) -> None:
        rid, h = u.request_id, self.handoff[u.request_id]
        if replica == h.decode and replica != h.prefill:
            if not h.first_seen:
                if not h.held:
                    h.since = time.monotonic()
                h.held.append(u)
                return
            self._deliver_update(u)
            self._moved(rid, h)
            return
        self._deliver_update(u)  # from the prefill side: its first token (or how it ended there)
        h.first_seen = True
        if u.finish_reason is not None:
            self.handoff.pop(rid, None)
        elif h.held:
            self._moved(rid, h)

    def _moved(self, rid: str, h: _Handoff) -> None:
        """The decode replica streams this request now: it is that replica's."""
        self.handoff.pop(rid, None)
        if rid in self.replica_of:
            self.replica_of[rid] = h.decode
        for u in h.held:
            self._deliver_update(u)
        h.held = []

    # -- requests out --------------------------------------------------------------------

    async def submit(self, outputs: RequestOutputs, prefix_hashes, cache_extra_keys, queue, meta: dict,
                     prompt_param: str = "prompt") -> int:
        """Submit every sample of `outputs` to one replica, all or none; their
        updates go to `queue` as (sample index, RequestUpdate). meta: tenant,
        key_id, http_request_id, model for metering. Raises APIError."""
        samples, n = outputs.samples, outputs.params.n
        # The adapter the router weighs (its residency): the request's LoRA, which is
        # also the first of the cache extra keys (lora id, cache salt).
        adapter = meta.get("lora") or (cache_extra_keys[0] if cache_extra_keys else None)
        for _attempt in range(3):
            t0 = time.time()
            route = await self._pick(prefix_hashes, max(map(len, outputs.prompts)), adapter)
            kind = "none" if route is None else ("pair" if route.decode is not None else "whole")
            self.routes[kind] = self.routes.get(kind, 0) + 1
            if self.tracing is not None and meta.get("trace"):
                self.tracing.record("router.route", meta["trace"], t0, time.time(), {
                    "ziggurat.replica": route.replica if route else None,
                    "ziggurat.decode_replica": route.decode if route else None})
            if route is None:
                route = await self._cold_start(prefix_hashes, max(map(len, outputs.prompts)), adapter)
            if route is None:
                raise APIError(503, "no healthy replica is available", "service_unavailable", code="no_replica")
            replica, decode = route.replica, route.decode
            try:
                futures = []
                for s in samples:
                    self.queues[s.request_id] = (queue, s.index)
                    self.replica_of[s.request_id] = replica
                    if decode is not None:
                        self.handoff[s.request_id] = _Handoff(replica, decode)
                    futures.append(self._send(replica, SubmitRequest(
                        s.request_id, outputs.prompts[s.prompt_index], s.params, self.ingress_id, cache_extra_keys,
                        **meta, bill_prompt=s.index % n == 0, prompt_param=prompt_param, decode_replica=decode)))
                results = await asyncio.gather(*futures)
                refused = next((res for res in results if not res.ok), None)
                if refused is not None:  # all or none: the accepted siblings end, unbilled
                    self.forget([s.request_id for s, res in zip(samples, results) if not res.ok])
                    self.abort([s.request_id for s, res in zip(samples, results) if res.ok], "refused")
                    if refused.code == "unavailable":
                        raise ReplicaDown()
                    raise _submit_error(refused)
                return replica
            except ReplicaDown:
                self.forget([s.request_id for s in samples])
                await self.mark_unhealthy(replica)
        raise APIError(503, "no healthy replica is available", "service_unavailable", code="no_replica")

    async def _pick(self, prefix_hashes, num_prompt_tokens: int = 0, adapter: str | None = None) -> Route | None:
        """The router's choice; if the router cannot answer (restarting), round robin
        (every replica can serve a request whole)."""
        try:
            r = await asyncio.wait_for(self.pick(prefix_hashes, num_prompt_tokens, adapter), 5.0)
            return Route(r) if isinstance(r, int) else r
        except APIError:
            raise
        except Exception as e:
            log.warning("router unavailable (%s); routing round robin", type(e).__name__)
            self.routes["fallback"] = self.routes.get("fallback", 0) + 1
            n = self.num_replicas()
            if not n:
                return None
            self._rr += 1
            return Route(self._rr % n)

    def num_replicas(self) -> int:
        return 0

    def can_submit(self, replica: int) -> bool:
        """This ingress has attached to the replica (a new one: once the supervisor said so)."""
        return True

    async def request_capacity(self) -> bool:
        """Ask for a replica (autoscaling from zero); True if one may come. The transport's."""
        return False

    async def _cold_start(self, prefix_hashes, num_prompt_tokens: int, adapter: str | None = None) -> Route | None:
        """No replica serves now: if the deployment can scale one up, wait for it (up to
        cold_start_timeout_s; the wait shows as cold_start_waiting on /metrics)."""
        if self.cold_start_timeout_s <= 0 or not await self.request_capacity():
            return None
        self.cold_waiting += 1
        try:
            deadline = time.monotonic() + self.cold_start_timeout_s
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                route = await self._pick(prefix_hashes, num_prompt_tokens, adapter)
                if route is not None and self.can_submit(route.replica):
                    return route
                await self.request_capacity()  # keep the demand fresh while we wait
            return None
        finally:
            self.cold_waiting -= 1

    def _send(self, replica: int, req: SubmitRequest) -> asyncio.Future:
        """Queue a submission; this turn's go to the replica in one submit_batch call."""
        fut = asyncio.get_running_loop().create_future()
        queued = self._outgoing.setdefault(replica, [])
        queued.append((req, fut))
        if len(queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush, replica)
        return fut

    def _flush(self, replica: int) -> None:
        batch = self._outgoing.pop(replica, [])
        if batch:
            asyncio.ensure_future(self._deliver(replica, batch))

    async def _deliver(self, replica: int, batch: list[tuple[SubmitRequest, asyncio.Future]]) -> None:
        futures = [f for _, f in batch]
        try:
            results = await self.submit_batch(replica, [r for r, _ in batch])
        except BaseException as e:  # not sent (serialization, shutting down) or the replica died: all fail alike
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            return
        for f, res in zip(futures, results):
            if not f.done():
                f.set_result(res)

    def abort(self, request_ids: list[str], reason: str = "aborted") -> None:
        by_replica: dict[int, list[str]] = {}
        for rid in request_ids:
            rep = self.replica_of.get(rid)
            if rep is not None:
                by_replica.setdefault(rep, []).append(rid)
            h = self.handoff.get(rid)
            if h is not None and h.decode != rep:  # it may be there already, or on its way
                by_replica.setdefault(h.decode, []).append(rid)
        for rep, ids in by_replica.items():
            self.send_abort(rep, ids, reason)
        self.forget(request_ids)

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self.queues.pop(rid, None)
            self.replica_of.pop(rid, None)
            self.handoff.pop(rid, None)


def _submit_error(res: SubmitResult) -> APIError:
    if res.code == "queue_full":
        return APIError(429, res.error, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if res.code == "internal":
        return APIError(500, res.error, "internal_error", code="internal")
    return bad(res.error, res.param, res.code if res.code == "context_length_exceeded" else None)
