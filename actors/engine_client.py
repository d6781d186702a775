"""EngineClient: an ingress's side of the token path.

It asks the Router once per request, submits to the chosen replica's
Scheduler, receives that scheduler's per-step TokenBatches (applied strictly
in sequence order, per replica and ingress incarnation) and hands each
request's updates to its asyncio queue; aborts go back the same way.
"""

from __future__ import annotations

import asyncio

import ray

from ziggurat.actors.gatekeeper import _await
from ziggurat.actors.messages import SubmitRequest, TokenBatch
from ziggurat.actors.openai_protocol import APIError, bad


class EngineClient:
    """Routes, submits, aborts and receives tokens for this ingress's requests."""

    def __init__(self, ingress_id: str, router, schedulers: list, epoch: str = ""):
        self.ingress_id, self.router, self.schedulers, self.epoch = ingress_id, router, schedulers, epoch
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, tuple[asyncio.Queue, int]] = {}
        self.replica_of: dict[str, int] = {}
        self.next_seq: dict[int, int] = {}  # per replica: the next TokenBatch to apply
        self.held: dict[int, dict[int, TokenBatch]] = {}  # batches that arrived early

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
                submitted = []
                for rid, ids, params, index in children:
                    self.queues[rid] = (queue, index)
                    self.replica_of[rid] = replica
                    res = await _await(self.schedulers[replica].submit.remote(
                        SubmitRequest(rid, ids, params, self.ingress_id, cache_extra_keys, **meta,
                                      bill_prompt=index % n_per_prompt == 0)))
                    if not res.ok:
                        self.forget([rid])
                        self.abort(submitted, "error")
                        if res.code == "unavailable":
                            raise _ReplicaDown()
                        raise _submit_error(res)
                    submitted.append(rid)
                return replica
            except (ray.exceptions.RayActorError, _ReplicaDown):
                self.forget([c[0] for c in children])
                await _await(self.router.mark_unhealthy.remote(replica))
        raise APIError(503, "no healthy replica is available", "service_unavailable", code="no_replica")

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
    return bad(res.error)
