"""The supervisor: owns a deployment's replicas and keeps them serving.

It builds every replica (a placement group, one worker actor per TP rank,
the scheduler actor that drives them) and then checks each scheduler's
health every `interval_s`, with a deadline:

    no answer within health_timeout_s  -> dead (the process is gone or wedged)
    answer says `failed`               -> dead (a step failed: a worker died, say)
    busy, no step ended for step_deadline_s -> dead (a stuck step)

A dead replica leaves routing at once (the router is told), every ingress
ends its requests on it (a request that streamed nothing is retried on
another replica; see actors/ingress/server.py), and the replica is rebuilt
under the same actor names: its new scheduler replays the usage events its
predecessor journaled and never saw acknowledged; the ingresses register
with it; the router takes it back when it reports.

Autoscaling (cluster/autoscale.py's `decide`) reads the router's view of the
replicas, RouterActor.load_signal(): one round trip a decision round, the
replicas asked directly only for what the router cannot speak for.

The router, the meter and the ingresses are restartable actors that Ray
restarts in place; the supervisor re-tells a restarted router which
replicas are down. `judge` is the policy, plain Python; `SupervisorActor`
the Ray shell.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import ray

log = logging.getLogger("ziggurat.supervisor")


def judge(health, *, step_deadline_s: float) -> str | None:
    """Why a replica counts as dead (None: healthy). `health` is a ReplicaHealth or
    the exception its health call raised (a timeout included)."""
    if isinstance(health, BaseException):
        return f"no answer ({type(health).__name__})"
    if health.failed:
        return "a step failed"
    if getattr(health, "gpu_errors", ()):
        return f"GPU error: {health.gpu_errors[0]}"
    if health.busy and health.seconds_since_progress > step_deadline_s:
        return f"no step ended for {health.seconds_since_progress:.0f} s"
    return None


@dataclass
class _Replica:
    index: int
    name: str
    pool: object = None  # its PoolSpec (role, TP size, placement)
    scheduler: object = None
    workers: list = field(default_factory=list)
    group: object = None
    state: str = "starting"  # starting | serving | rebuilding | failed
    incarnation: str = ""
    rebuilds: int = 0
    last_death: str = ""
    phase: str = ""  # start-up progress: placing, loading (weights, KV cache, CUDA graphs), ready
    detail: str = ""


@ray.remote(num_cpus=0, max_concurrency=64)
class SupervisorActor:
    def __init__(self, cfg, spec, names: dict, use_gpu: bool, interval_s: float = 0.5,
                 health_timeout_s: float = 10.0, step_deadline_s: float = 60.0):
        """cfg: the EngineConfig every replica runs; names: router, meter, scheduler
        names and the usage-journal directory (the launcher's)."""
        from ziggurat.actors.process import configure_logging

        configure_logging()
        self.cfg, self.spec, self.names, self.use_gpu = cfg, spec, names, use_gpu
        self.interval_s, self.health_timeout_s, self.step_deadline_s = interval_s, health_timeout_s, step_deadline_s
        pools = spec.replica_pools()
        self.replicas = [_Replica(r, n, pools[r]) for r, n in enumerate(names["schedulers"])]
        for rep, on in zip(self.replicas, spec.initially_serving()):
            rep.state = "starting" if on else "stopped"  # a stopped slot is built when its pool scales up
        self._scaling: dict[int, object] = {}  # id(pool) -> autoscale.PoolState
        self._demand_at = 0.0  # when an ingress last had a request no replica could take (a cold start)
        self._loads = None  # this autoscaling round's RouterActor.load_signal()
        # Prefill/decode: every scheduler can reach the others by name (hand-offs, releases).
        self.pd = bool({"prefill", "decode"} & set(spec.roles))
        self.ingresses: list = []
        self.events: list[dict] = []  # what happened, for tests and operators
        self._watch: asyncio.Task | None = None
        self._last_ok: dict[str, float] = {}  # restartable actor -> when it last answered its health check
        self.unresponsive_s = 60.0  # alive but silent this long: killed, so that Ray restarts it

    def _routers(self) -> list:
        return [ray.get_actor(n) for n in self.names.get("routers", [self.names["router"]])]

    # -- building ------------------------------------------------------------------------

    async def start(self) -> list:
        """Build every replica that serves from the start; returns their ReplicaInfo. Then keep watching."""
        infos = await asyncio.gather(*[self._build(rep) for rep in self.replicas if rep.state == "starting"])
        self._request_resources()
        return infos

    def watch(self, ingresses: list) -> None:
        self.ingresses = list(ingresses)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
            self._watch_others = asyncio.get_running_loop().create_task(self._watch_restartable())
            if any(p.scales for p in self.spec.pools):
                self._scale_task = asyncio.get_running_loop().create_task(self._autoscale_loop())

    async def _build(self, rep: _Replica):
        from ziggurat.actors.scheduler.actor import SchedulerActor
        from ziggurat.actors.worker.actor import WorkerActor
        from ziggurat.topology.placement import bundle_strategy, check_fits, replica_bundles

        pool = rep.pool
        cfg = pool.engine_config(self.cfg)
        tp = cfg.tensor_parallel_size
        gpus = pool.gpus_per_worker or self.spec.gpus_per_worker
        bundles = replica_bundles(tp, self.use_gpu, gpus_per_worker=gpus, resources=pool.resources)
        if not self.spec.autoscaler:  # fail now, naming what is missing, rather than after the timeout
            why = check_fits(ray.nodes(), bundles, f"replica {rep.index} ({pool.role}, TP {tp})")
            if why is not None:
                raise RuntimeError(why)
        t0 = time.monotonic()
        rep.phase, rep.detail = "placing", f"{tp} worker(s) of {bundles[0]}"
        pg = ray.util.placement_group(bundles, strategy="STRICT_PACK")
        try:
            await asyncio.wait_for(pg.ready(), 120)
        except asyncio.TimeoutError:
            ray.util.remove_placement_group(pg)
            raise RuntimeError(f"replica {rep.index} ({pool.role}): could not place {tp} worker(s) of {bundles[0]} "
                               f"on one node within 120 s; cluster resources: {ray.cluster_resources()}") from None
        opts = dict(num_gpus=gpus if self.use_gpu else 0, num_cpus=1, resources=dict(pool.resources))
        workers = [WorkerActor.options(scheduling_strategy=bundle_strategy(pg, rank), **opts).remote(
            cfg, rank, self.spec.worker_cls) for rank in range(tp)]
        router = self._routers()  # every router gets the scheduler's stats and KV events
        meter = ray.get_actor(self.names["meter"])
        journal = f"{self.names['journal_dir']}/{rep.name}.jsonl"
        scheduler = SchedulerActor.options(num_cpus=0, name=rep.name).remote(
            cfg, workers, rep.index, router, self.spec.max_waiting, meter, journal, pool.role,
            self.names["schedulers"] if self.pd else None, self.spec.ingress.served_model_name or "")
        rep.scheduler, rep.workers, rep.group = scheduler, workers, pg
        rep.phase, rep.detail = "loading", "weights, KV cache, CUDA graphs"
        info = await scheduler.info.remote()
        rep.phase = "ready"
        rep.detail = (f"{info.num_blocks} KV blocks ({info.num_blocks * info.block_size} tokens), "
                      f"max_model_len {info.max_model_len}, {time.monotonic() - t0:.1f} s")
        rep.incarnation, rep.state = info.incarnation, "serving"
        return info

    def _tear_down(self, rep: _Replica) -> None:
        for actor in [rep.scheduler, *rep.workers]:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        if rep.group is not None:
            try:
                ray.util.remove_placement_group(rep.group)
            except Exception:
                pass
        rep.scheduler, rep.workers, rep.group = None, [], None

    # -- watching ------------------------------------------------------------------------

    async def _health(self, rep: _Replica):
        try:
            return await asyncio.wait_for(rep.scheduler.health.remote(), self.health_timeout_s)
        except BaseException as e:  # noqa: BLE001 - any failure to answer is the verdict
            return e

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("supervisor check failed")

    async def check(self) -> None:
        serving = [rep for rep in self.replicas if rep.state == "serving"]
        verdicts = await asyncio.gather(*[self._health(rep) for rep in serving])
        for rep, health in zip(serving, verdicts):
            why = judge(health, step_deadline_s=self.step_deadline_s)
            if why is not None:
                rep.state = "rebuilding"
                asyncio.get_running_loop().create_task(self._rebuild(rep, why))
        for router in self._routers():
            for rep in self.replicas:  # a restarted router believes every replica healthy
                if rep.state != "serving":
                    router.mark_unhealthy.remote(rep.index)

    async def _watch_restartable(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                await self.check_restartable()
            except Exception:
                log.exception("supervisor check of the router, meter and ingresses failed")

    async def check_restartable(self) -> None:
        """Router, meter and ingresses restart in place when they die (Ray does it); one
        that is alive but has not answered its health check for unresponsive_s (a
        wedged event loop, say) is killed, so that Ray restarts it."""
        meter = ray.get_actor(self.names["meter"])
        probes = {"meter": (meter, meter.has_keys.remote())}
        for i, router in enumerate(self._routers()):
            probes["router" if i == 0 else f"router{i}"] = (router, router.healthy.remote())
        for i, ing in enumerate(self.ingresses):
            probes[f"ingress{i}"] = (ing, ing.health.remote())

        async def answered(name, ref):
            try:
                out = await asyncio.wait_for(ref, self.health_timeout_s)
                return not (name.startswith("ingress") and not out["serving"])
            except BaseException:  # noqa: BLE001 - restarting (Ray is on it) or wedged
                return False

        oks = await asyncio.gather(*[answered(n, ref) for n, (_, ref) in probes.items()])
        now = time.monotonic()
        for (name, (actor, _)), ok in zip(probes.items(), oks):
            last = self._last_ok.setdefault(name, now)
            if ok:
                self._last_ok[name] = now
            elif now - last > self.unresponsive_s:
                log.warning("%s has not answered a health check for %.0f s; restarting it", name, now - last)
                self.events.append({"actor": name, "event": "restarted", "at": time.time()})
                self._last_ok[name] = now  # give the restart its time
                try:
                    ray.kill(actor, no_restart=False)
                except Exception:
                    pass

    async def _rebuild(self, rep: _Replica, why: str) -> None:
        t0 = time.monotonic()
        rep.last_death = why
        log.warning("replica %d is dead (%s); rebuilding", rep.index, why)
        self.events.append({"replica": rep.index, "event": "dead", "why": why, "at": time.time()})
        try:
            for router in self._routers():
                router.mark_unhealthy.remote(rep.index)
        except Exception:
            pass
        for ing in self.ingresses:
            ing.replica_failed.remote(rep.index)
        if self.pd:  # free what its peers hold for it, end what waits on it
            for other in self.replicas:
                if other is not rep and other.scheduler is not None:
                    other.scheduler.peer_failed.remote(rep.index)
        self._tear_down(rep)
        for attempt in range(5):
            try:
                await self._build(rep)
                break
            except Exception as e:
                log.warning("replica %d: rebuild attempt %d failed (%s)", rep.index, attempt + 1, e)
                self._tear_down(rep)
                await asyncio.sleep(min(30, 2 ** attempt))
        else:
            rep.state = "failed"
            self.events.append({"replica": rep.index, "event": "gave_up", "at": time.time()})
            return
        rep.rebuilds += 1
        await self._serve(rep, "rebuilt", t0)
        log.warning("replica %d rebuilt in %.1f s", rep.index, time.monotonic() - t0)

    async def _serve(self, rep: _Replica, event: str, t0: float) -> None:
        """A replica just built (rebuilt, or a scaled-up slot): every ingress attaches, then it serves."""
        rep.state = "attaching"
        await asyncio.gather(*[ing.replica_rebuilt.remote(rep.index) for ing in self.ingresses],
                             return_exceptions=True)
        rep.state = "serving"
        self.events.append({"replica": rep.index, "event": event, "seconds": time.monotonic() - t0,
                            "at": time.time()})

    # -- autoscaling (policy: cluster/autoscale.py) --------------------------------------

    def demand(self) -> bool:
        """An ingress has a request no serving replica can take: scale a pool up from zero.
        True if some pool can grow (the ingress then waits for it, with a bound)."""
        self._demand_at = time.monotonic()
        return any(p.hi > 0 for p in self.spec.pools)

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.autoscale()
            except Exception:
                log.exception("autoscaling check failed")

    async def autoscale(self) -> None:
        from ziggurat.cluster.autoscale import PoolState, decide

        now = time.monotonic()
        demand = now - self._demand_at < 5.0
        self._loads = None  # the router's view: one call for every pool of this round
        for pool in self.spec.pools:
            if not pool.scales:
                continue
            reps = [r for r in self.replicas if r.pool is pool]
            serving = [r for r in reps if r.state == "serving"]
            starting = sum(r.state in ("starting", "rebuilding", "attaching") for r in reps)

            got = await self._pool_signal(serving)
            state = self._scaling.setdefault(id(pool), PoolState())
            action, which = decide(self.spec.autoscaling, state, now, got, starting, len(serving) + starting,
                                   pool.lo, pool.hi, demand)
            if action == "up":
                rep = next((r for r in reps if r.state == "stopped"), None)
                if rep is not None:
                    rep.state = "starting"
                    asyncio.get_running_loop().create_task(self._scale_up(rep))
            elif action == "down":
                rep = self.replicas[which]
                rep.state = "stopping"
                asyncio.get_running_loop().create_task(self._scale_down(rep))

    async def _router_loads(self) -> list | None:
        """The router's view of every replica (RouterActor.load_signal), one round trip;
        the next router if one does not answer; None if none does."""
        for router in self._routers():
            try:
                return await asyncio.wait_for(router.load_signal.remote(), 2.0)
            except BaseException:  # noqa: BLE001 - restarting: the next one sees the same
                continue
        return None

    async def _pool_signal(self, serving: list) -> list:
        """What `decide` reads for these serving replicas: the router's view (queue depth with
        its picks since, KV usage, resident adapters), fetched once a decision round; a
        replica the router cannot speak for is asked itself."""
        from ziggurat.cluster.autoscale import router_view

        if self._loads is None:
            self._loads = await self._router_loads()
        got, ask = router_view(self._loads, [r.index for r in serving])

        async def stats(r):
            try:
                return await asyncio.wait_for(r.scheduler.stats.remote(), 2.0)
            except BaseException:  # noqa: BLE001 - its health check deals with it
                return None

        direct = await asyncio.gather(*[stats(self.replicas[i]) for i in ask])
        return got + [s for s in direct if s is not None]

    async def _scale_up(self, rep: _Replica) -> None:
        t0 = time.monotonic()
        log.warning("replica %d (%s): scaling up", rep.index, rep.pool.role)
        self._request_resources()
        try:
            await self._build(rep)
        except Exception as e:
            log.warning("replica %d: scale-up failed (%s)", rep.index, e)
            self._tear_down(rep)
            rep.state = "stopped"
            self.events.append({"replica": rep.index, "event": "scale_up_failed", "why": str(e), "at": time.time()})
            return
        await self._serve(rep, "scaled_up", t0)

    async def _scale_down(self, rep: _Replica) -> None:
        log.warning("replica %d (%s): idle, scaling down", rep.index, rep.pool.role)
        try:
            for router in self._routers():
                router.mark_unhealthy.remote(rep.index)  # no new requests
        except Exception:
            pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # what raced in before the router knew finishes first
            try:
                s = await asyncio.wait_for(rep.scheduler.stats.remote(), 2.0)
                if not (s.num_running or s.num_waiting or s.num_sending or s.num_receiving):
                    break
            except BaseException:  # noqa: BLE001
                break
            await asyncio.sleep(0.2)
        try:
            await asyncio.wait_for(rep.scheduler.shutdown.remote(), 15)  # meters what is left
        except BaseException:  # noqa: BLE001
            pass
        self._tear_down(rep)
        rep.state = "stopped"
        self.events.append({"replica": rep.index, "event": "scaled_down", "at": time.time()})
        self._request_resources()

    def _request_resources(self) -> None:
        """Tell the Ray autoscaler what the serving and starting replicas need (it adds or
        removes nodes to match)."""
        from ziggurat.topology.placement import replica_bundles

        bundles = []
        for r in self.replicas:
            if r.state in ("starting", "serving", "rebuilding", "attaching"):
                tp = r.pool.tensor_parallel_size or self.cfg.tensor_parallel_size
                bundles += replica_bundles(tp, self.use_gpu, gpus_per_worker=r.pool.gpus_per_worker
                                           or self.spec.gpus_per_worker, resources=r.pool.resources)
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        except Exception as e:  # no autoscaler on this cluster: nothing to tell
            log.debug("request_resources: %s", e)

    # -- for the launcher and tests ------------------------------------------------------

    def status(self) -> list[dict]:
        return [{"replica": r.index, "role": r.pool.role, "state": r.state, "rebuilds": r.rebuilds,
                 "incarnation": r.incarnation, "last_death": r.last_death, "phase": r.phase, "detail": r.detail}
                for r in self.replicas]

    def history(self) -> list[dict]:
        return list(self.events)

    def handles(self, replica: int) -> dict:
        rep = self.replicas[replica]
        return {"scheduler": rep.scheduler, "workers": list(rep.workers)}

    async def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch_others.cancel()
            if getattr(self, "_scale_task", None) is not None:
                self._scale_task.cancel()
            self._watch = None
        for rep in self.replicas:
            if rep.scheduler is not None:
                try:
                    await asyncio.wait_for(rep.scheduler.shutdown.remote(), 15)
                except BaseException:  # noqa: BLE001
                    pass
            self._tear_down(rep)
