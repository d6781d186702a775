"""RayEngineClient: the engine client over the router and scheduler actors (a deployment's).

Scheduler actors are looked up by name, so a replica the supervisor rebuilt
(a new actor under the same name) is reached by attaching again (`attach`).

With several router actors (they share one view: every scheduler feeds them
all), requests take them in turn, one round trip each; a router that fails to
answer sends the next request to the next one.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from ziggurat.actors.ingress import refs
from ziggurat.actors.ingress.engine_client import EngineClient, ReplicaDown
from ziggurat.actors.scheduler.messages import ReplicaStats, SubmitRequest, SubmitResult

log = logging.getLogger("ziggurat.ingress")

SUBMIT_TIMEOUT_S = 15.0  # a scheduler that takes longer to accept a submission is treated as down


class RayEngineClient(EngineClient):
    def __init__(self, ingress_id: str, router, scheduler_names: list[str], epoch: str = "", me=None,
                 supervisor: str | None = None, cold_start_timeout_s: float = 0.0):
        """router: its handle, or several (a restartable actor keeps its handle); me: this ingress's
        own handle; supervisor: its name (asked for capacity when no replica serves: autoscaling from zero)."""
        super().__init__(ingress_id, epoch)
        self.routers = list(router) if isinstance(router, (list, tuple)) else [router]
        self._next_router = 0
        self.names, self.me = list(scheduler_names), me
        self.supervisor_name = supervisor
        self.cold_start_timeout_s = cold_start_timeout_s if supervisor else 0.0
        self.schedulers: list = [None] * len(self.names)

    def attach(self, replica: int, timeout_s: float = 30.0) -> bool:
        """(Re)register with replica's current scheduler (blocking; call from an actor
        thread). False if it cannot be reached now: it stays out until attached."""
        try:
            handle = ray.get_actor(self.names[replica])
            reg = ray.get(handle.register_ingress.remote(self.ingress_id, self.me, self.epoch), timeout=timeout_s)
        except Exception as e:
            log.warning("replica %d not attached (%s)", replica, type(e).__name__)
            return False
        self.schedulers[replica] = handle
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.attached, reg)
        else:
            self.attached(reg)
        return True

    def num_replicas(self) -> int:
        return len(self.names)

    def can_submit(self, replica: int) -> bool:
        return self.schedulers[replica] is not None

    async def request_capacity(self) -> bool:
        try:
            sup = ray.get_actor(self.supervisor_name)
            return bool(await refs.result(sup.demand.remote(), 5.0))
        except Exception as e:
            log.warning("could not ask for capacity (%s)", type(e).__name__)
            return False

    @property
    def router(self):
        return self.routers[self._next_router % len(self.routers)]

    async def pick(self, prefix_hashes: list[bytes], num_prompt_tokens: int = 0, adapter: str | None = None):
        router = self.router
        self._next_router += 1
        try:
            return await refs.result(router.route.remote(prefix_hashes, num_prompt_tokens, adapter), 5.0)
        except Exception:
            if len(self.routers) == 1:
                raise
            # That router is restarting: the next one answers (it sees the same events).
            return await refs.result(self.router.route.remote(prefix_hashes, num_prompt_tokens, adapter), 5.0)

    async def submit_batch(self, replica: int, reqs: list[SubmitRequest]) -> list[SubmitResult]:
        handle = self.schedulers[replica]
        if handle is None:
            raise ReplicaDown()
        try:
            return await refs.result(handle.submit_batch.remote(reqs), SUBMIT_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise ReplicaDown() from e
        except asyncio.TimeoutError:  # wedged: route elsewhere; should the call land later, end it unbilled
            handle.abort.remote([r.request_id for r in reqs], "refused")
            raise ReplicaDown() from None

    def send_abort(self, replica: int, request_ids: list[str], reason: str) -> None:
        handle = self.schedulers[replica]
        if handle is not None:
            handle.abort.remote(request_ids, reason)

    async def mark_unhealthy(self, replica: int) -> None:
        for router in self.routers:
            try:
                await asyncio.wait_for(refs.result(router.mark_unhealthy.remote(replica)), 5.0)
            except Exception as e:  # the router restarting: the supervisor tells it again
                log.warning("router not told that replica %d is down (%s)", replica, type(e).__name__)

    async def healthy(self) -> list[int]:
        """The router's view; if the router cannot answer, the replicas that answer a stats call."""
        try:
            return await asyncio.wait_for(refs.result(self.router.healthy.remote()), 2.0)
        except Exception:
            stats = await self.replica_stats()
            return [s.replica for s in stats if not isinstance(s, BaseException)]

    async def replica_stats(self) -> list[ReplicaStats | BaseException]:
        async def one(handle):
            if handle is None:
                raise ReplicaDown()
            return await asyncio.wait_for(refs.result(handle.stats.remote()), 2.0)

        return await asyncio.gather(*[one(s) for s in self.schedulers], return_exceptions=True)
