"""RayEngineClient: the engine client over the router and scheduler actors (a deployment's)."""

from __future__ import annotations

import asyncio

import ray

from ziggurat.actors.ingress import refs
from ziggurat.actors.ingress.engine_client import EngineClient, ReplicaDown
from ziggurat.actors.scheduler.messages import ReplicaStats, SubmitRequest, SubmitResult


class RayEngineClient(EngineClient):
    def __init__(self, ingress_id: str, router, schedulers: list, epoch: str = ""):
        super().__init__(ingress_id, epoch)
        self.router, self.schedulers = router, schedulers

    async def pick(self, prefix_hashes: list[bytes]) -> int | None:
        return await refs.result(self.router.pick.remote(prefix_hashes))

    async def submit_batch(self, replica: int, reqs: list[SubmitRequest]) -> list[SubmitResult]:
        try:
            return await refs.result(self.schedulers[replica].submit_batch.remote(reqs))
        except ray.exceptions.RayActorError as e:
            raise ReplicaDown() from e

    def send_abort(self, replica: int, request_ids: list[str], reason: str) -> None:
        self.schedulers[replica].abort.remote(request_ids, reason)

    async def mark_unhealthy(self, replica: int) -> None:
        await refs.result(self.router.mark_unhealthy.remote(replica))

    async def healthy(self) -> list[int]:
        return await refs.result(self.router.healthy.remote())

    async def replica_stats(self) -> list[ReplicaStats | BaseException]:
        return await asyncio.gather(*[refs.result(s.stats.remote()) for s in self.schedulers], return_exceptions=True)
