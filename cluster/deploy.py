"""Deploying a ziggurat endpoint on a Ray cluster.

    dep = ziggurat.cluster.deploy.serve(model="/models/llama", tensor_parallel_size=2, replicas=2, port=8000)
    print(dep.url)            # OpenAI-compatible endpoint
    dep.run_forever()         # or dep.shutdown()

For each replica: a STRICT_PACK placement group with one bundle per TP rank,
WorkerActors in it, and a SchedulerActor that drives them. One RouterActor
and one IngressActor (HTTP) serve all replicas.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ziggurat.cluster.spec import DeploymentSpec

log = logging.getLogger("ziggurat.deploy")


class Deployment:
    def __init__(self, spec: DeploymentSpec):
        from ziggurat.actors.ingress.actor import IngressActor
        from ziggurat.actors.meter.actor import MeterActor
        from ziggurat.actors.router.actor import RouterActor
        from ziggurat.actors.scheduler.actor import SchedulerActor
        from ziggurat.actors.worker.actor import WorkerActor
        from ziggurat.topology.placement import bundle_strategy, create_replica_group

        cfg = spec.engine
        if cfg.device is None:
            cfg = dataclasses.replace(cfg, device="cuda" if ray.cluster_resources().get("GPU", 0) else "cpu")
        use_gpu = cfg.device.startswith("cuda")
        tp = cfg.tensor_parallel_size
        icfg = spec.ingress
        if icfg.served_model_name is None:
            icfg = dataclasses.replace(icfg, served_model_name=Path(cfg.model).name)
        # All ingresses share one port; check it first, since SO_REUSEPORT would
        # otherwise quietly share it with another server.
        icfg = dataclasses.replace(icfg, port=icfg.port or _free_port(icfg.host))
        _check_port_free(icfg.host, icfg.port)
        self.spec = dataclasses.replace(spec, engine=cfg, ingress=icfg)
        tag = uuid.uuid4().hex[:8]
        self.groups, self.workers, self.schedulers = [], [], []
        self.db = spec.db_url
        # Named, so a (restartable) ingress takes names, not handles: Ray cannot
        # rebuild an actor whose constructor arguments are references (ray#53727).
        self.meter_name, self.router_name = f"ziggurat-meter-{tag}", f"ziggurat-router-{tag}"
        self.meter = MeterActor.options(name=self.meter_name).remote(self.db)
        self.router = RouterActor.options(name=self.router_name).remote(spec.replicas)
        self.scheduler_names: list[str] = []
        try:
            for r in range(spec.replicas):
                pg = create_replica_group(tp, use_gpu, name=f"ziggurat-{tag}-replica{r}")
                self.groups.append(pg)
                opts = dict(num_gpus=1 if use_gpu else 0, num_cpus=1)
                ws = [WorkerActor.options(scheduling_strategy=bundle_strategy(pg, rank), **opts).remote(
                    cfg, rank, spec.worker_cls) for rank in range(tp)]
                self.workers.append(ws)
                self.scheduler_names.append(f"ziggurat-scheduler-{tag}-{r}")
                self.schedulers.append(SchedulerActor.options(num_cpus=0, name=self.scheduler_names[-1]).remote(
                    cfg, ws, r, self.router, spec.max_waiting, self.meter))
            self.info = ray.get([s.info.remote() for s in self.schedulers])
            # Every ingress checks requests against what every replica can hold.
            limits = min(self.info, key=lambda i: i.max_model_len)
            self.ingresses = []
            for i in range(spec.ingresses):
                ingress_id = f"ziggurat-ingress-{tag}-{i}"
                # Ingresses share the port of this (the driver's) node.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self.ingresses.append(IngressActor.options(name=ingress_id, scheduling_strategy=here).remote(
                    icfg, limits, ingress_id, self.router_name, self.scheduler_names, self.meter_name))
            self.ingress = self.ingresses[0]
            ray.get([ing.url.remote() for ing in self.ingresses])  # all listening
            self.url = ray.get(self.ingress.url.remote())
            self.open = ray.get(self.ingress.is_open.remote())
            self.served_model_name = icfg.served_model_name
        except BaseException:
            self.shutdown()
            raise

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def run_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM (e.g. `ray job stop`), then shut down cleanly."""
        import signal

        def stop(signum, frame):
            raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        from ziggurat.topology.placement import release

        for actor in list(getattr(self, "ingresses", [])) + list(self.schedulers):
            if actor is not None:
                try:
                    ray.get(actor.shutdown.remote(), timeout=15)
                except Exception:
                    pass
        for actor in (list(getattr(self, "ingresses", [])) + [self.router] + self.schedulers
                      + [w for ws in self.workers for w in ws] + [getattr(self, "meter", None)]):
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        for pg in self.groups:
            release(pg)
        self.schedulers, self.workers, self.groups = [], [], []


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot serve on {host}:{port}: {e.strerror} (is another server using it?)") from None


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_ray(num_cpus: int | None = None) -> dict:
    """Join the cluster in RAY_ADDRESS, or start a local one. Returns its info."""
    if ray.is_initialized():
        return {"dashboard_url": None}
    if os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
    else:
        ctx = ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=True,
                       logging_level=logging.WARNING)
    return {"dashboard_url": getattr(ctx, "dashboard_url", None)}


def serve(spec: DeploymentSpec | None = None, **kwargs) -> Deployment:
    """Start a deployment from a driver script (works under `ray job submit`):
    a DeploymentSpec, or its fields by name (DeploymentSpec.from_flat)."""
    ensure_ray()
    return Deployment(spec if spec is not None else DeploymentSpec.from_flat(**kwargs))
