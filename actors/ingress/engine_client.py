"""EngineClient: an ingress's side of the token path.

It asks the Router once per request, submits to the chosen replica's
Scheduler, receives that scheduler's per-step TokenBatches (applied strictly
in sequence order, per replica and ingress incarnation) and hands each
request's updates to its asyncio queue; aborts go back the same way.

Submissions made in one turn of the event loop travel to a scheduler as one
call (a burst of arrivals costs the scheduler a few actor calls, not one
each: every call it serves takes its process's GIL from the step loop).
"""

from __future__ import annotations

import asyncio

import ray

from ziggurat.actors.ingress.gatekeeper import _await
from ziggurat.actors.scheduler.messages import SubmitRequest, TokenBatch
from ziggurat.actors.ingress.protocol import APIError, bad


class EngineClient:
    """Routes, submits, aborts and receives tokens for this ingress's requests."""

    def __init__(self, ingress_id: str, router, schedulers: list, epoch: str = ""):
        self.ingress_id, self.router, self.schedulers, self.epoch = ingress_id, router, schedulers, epoch
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, tuple[asyncio.Queue, int]] = {}
        self.replica_of: dict[str, int] = {}
        self.next_seq: dict[int, int] = {}  # per replica: the next TokenBatch to apply
        self.held: dict[int, dict[int, TokenBatch]] = {}  # batches that arrived early
        self._outgoing: dict[int, list[tuple[SubmitRequest, asyncio.Future]]] = {}  # per replica, this turn's

    # Called from Ray's thread.
    def push_tokens(self, batches: list[TokenBatch]) -> None:
        self.loop.call_soon_threadsafe(self._dispatch, batches)

    def _dispatch(self, batches: list[TokenBatch]) -> None:
        for batch in batches:
            self._apply(batch)

    def _apply(self, batch: TokenBatch) -> None:
        # Ray may run concurrent push_tokens calls out of order: apply each
        # replica's batches strictly by sequence number.
        if batch.epoch != self.epoch:
            return  # numbered for an earlier incarnation of this ingress
        replica = batch.replica
        held = self.held.setdefault(replica, {})
        held[batch.seq] = batch
        expected = self.next_seq.get(replica, 0)
        while expected in held:
            for u in held.pop(expected).updates:
                entry = self.queues.get(u.request_id)
                if entry is not None:
                    entry[0].put_nowait((entry[1], u))
            expected += 1
        self.next_seq[replica] = expected

    async def submit(self, children: list[tuple[str, list[int], object, int]], prefix_hashes, cache_extra_keys, queue,
                     meta: dict, n_per_prompt: int = 1):
        """children: (request id, prompt ids, params, child index); meta: tenant,
        key_id, http_request_id, model for metering. Raises APIError."""
        for attempt in range(3):
            replica = await _await(self.router.pick.remote(prefix_hashes))
            if replica is None:
                raise APIError(503, "no healthy replica is available", "service_unavailable", code="no_replica")
            try:
                futures = []
                for rid, ids, params, index in children:
                    self.queues[rid] = (queue, index)
                    self.replica_of[rid] = replica
                    futures.append(self._send(replica, SubmitRequest(
                        rid, ids, params, self.ingress_id, cache_extra_keys, **meta,
                        bill_prompt=index % n_per_prompt == 0)))
                results = await asyncio.gather(*futures)
                refused = next((res for res in results if not res.ok), None)
                if refused is not None:  # all or none: the accepted siblings end as errors
                    self.forget([c[0] for c, res in zip(children, results) if not res.ok])
                    self.abort([c[0] for c, res in zip(children, results) if res.ok], "error")
                    if refused.code == "unavailable":
                        raise _ReplicaDown()
                    raise _submit_error(refused)
                return replica
            except (ray.exceptions.RayActorError, _ReplicaDown):
                self.forget([c[0] for c in children])
                await _await(self.router.mark_unhealthy.remote(replica))
        raise APIError(503, "no healthy replica is available", "service_unavailable", code="no_replica")

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
            results = await _await(self.schedulers[replica].submit_batch.remote([r for r, _ in batch]))
        except BaseException as e:  # not sent (serialization, Ray shutting down) or the replica died: all fail alike
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
        for rep, ids in by_replica.items():
            self.schedulers[rep].abort.remote(ids, reason)
        self.forget(request_ids)

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self.queues.pop(rid, None)
            self.replica_of.pop(rid, None)


class _ReplicaDown(Exception):
    pass


def _submit_error(res) -> APIError:
    if res.code == "queue_full":
        return APIError(429, res.error, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if res.code == "context_length_exceeded":
        return bad(res.error, "messages", "context_length_exceeded")
    if res.code == "internal":
        return APIError(500, res.error, "internal_error", code="internal")
    return bad(res.error)
