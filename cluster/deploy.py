"""Deploying a ziggurat endpoint on a Ray cluster.

    dep = ziggurat.cluster.deploy.serve(model="/models/llama", tensor_parallel_size=2, replicas=2, port=8000)
    print(dep.url)            # OpenAI-compatible endpoint
    dep.run_forever()         # or dep.shutdown()

For each replica: a STRICT_PACK placement group with one bundle per TP rank,
WorkerActors in it, and a SchedulerActor that drives them. One RouterActor
and one IngressActor (HTTP) serve all replicas.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ziggurat.config import EngineConfig

log = logging.getLogger("ziggurat.deploy")


def cache_dir() -> Path:
    return Path(os.environ.get("ZIGGURAT_CACHE", Path.home() / ".cache" / "ziggurat"))


def default_model_dir() -> Path:
    """The embedded default model: a small random-weight Llama with a trained
    tokenizer and chat template, made on first use."""
    path = cache_dir() / "models" / "default-llama-tiny"
    if not (path / "config.json").is_file():
        from ziggurat.models.maker import make_model

        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        make_model(tmp, arch="llama", preset="tiny", seed=0)
        tmp.rename(path) if not path.exists() else None
    return path


@dataclass
class DeploymentSpec:
    model: str | None = None
    served_model_name: str | None = None
    tensor_parallel_size: int = 1
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    ingresses: int = 1  # HTTP actors sharing the port (SO_REUSEPORT)
    api_keys: tuple[str, ...] = ()
    device: str | None = None
    dtype: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    seed: int = 0
    max_waiting: int | None = None
    # The worker implementation, as "module:Class" (a zero-cost worker for
    # control-plane benchmarks, say).
    worker_cls: str = "ziggurat.models.worker:Worker"
    # Tenant plane: the ledger/tenant database (SQLite path or postgresql:// URL;
    # None = <cache>/tenancy.db), the admin API key, and the opt-in to share
    # the prefix cache across tenants.
    db: str | None = None
    admin_key: str | None = None
    share_prefix_cache: bool = False
    redact: str | None = None
    extra: dict = field(default_factory=dict)

    def engine_config(self) -> EngineConfig:
        names = {f.name for f in fields(EngineConfig)}
        kw = {k: getattr(self, k) for k in names if hasattr(self, k) and k != "extra"}
        return EngineConfig(**kw, extra=dict(self.extra))


class Deployment:
    def __init__(self, spec: DeploymentSpec):
        from ziggurat.actors.ingress.actor import IngressActor, IngressConfig
        from ziggurat.actors.meter.actor import MeterActor
        from ziggurat.actors.router.actor import RouterActor
        from ziggurat.actors.scheduler.actor import SchedulerActor
        from ziggurat.actors.worker.actor import WorkerActor
        from ziggurat.topology.placement import bundle_strategy, create_replica_group

        if spec.model is None:
            spec.model = str(default_model_dir())
        self.spec = spec
        cfg = spec.engine_config()
        use_gpu = (spec.device or ("cuda" if ray.cluster_resources().get("GPU", 0) else "cpu")).startswith("cuda")
        if use_gpu and cfg.device is None:
            cfg = EngineConfig(**{**cfg.__dict__, "device": "cuda"})
        elif not use_gpu and cfg.device is None:
            cfg = EngineConfig(**{**cfg.__dict__, "device": "cpu"})
        # All ingresses share one port; check it first, since SO_REUSEPORT would
        # otherwise quietly share it with another server.
        port = spec.port or _free_port(spec.host)
        _check_port_free(spec.host, port)
        tag = uuid.uuid4().hex[:8]
        self.groups, self.workers, self.schedulers = [], [], []
        self.db = spec.db or str(cache_dir() / "tenancy.db")
        # Named, so a (restartable) ingress takes names, not handles: Ray cannot
        # rebuild an actor whose constructor arguments are references (ray#53727).
        self.meter_name, self.router_name = f"ziggurat-meter-{tag}", f"ziggurat-router-{tag}"
        self.meter = MeterActor.options(name=self.meter_name).remote(self.db)
        self.router = RouterActor.options(name=self.router_name).remote(spec.replicas)
        self.scheduler_names: list[str] = []
        try:
            for r in range(spec.replicas):
                pg = create_replica_group(spec.tensor_parallel_size, use_gpu, name=f"ziggurat-{tag}-replica{r}")
                self.groups.append(pg)
                opts = dict(num_gpus=1 if use_gpu else 0, num_cpus=1)
                ws = [WorkerActor.options(scheduling_strategy=bundle_strategy(pg, rank), **opts).remote(cfg, rank, spec.worker_cls)
                      for rank in range(spec.tensor_parallel_size)]
                self.workers.append(ws)
                self.scheduler_names.append(f"ziggurat-scheduler-{tag}-{r}")
                self.schedulers.append(SchedulerActor.options(num_cpus=0, name=self.scheduler_names[-1]).remote(
                    cfg, ws, r, self.router, spec.max_waiting, self.meter))
            infos = ray.get([s.info.remote() for s in self.schedulers])
            self.info = infos
            icfg = IngressConfig(
                model_dir=spec.model,
                served_model_name=spec.served_model_name or Path(spec.model).name,
                host=spec.host,
                port=port,
                api_keys=tuple(spec.api_keys),
                block_size=spec.block_size,
                max_model_len=min(i["max_model_len"] for i in infos),
                admin_key=spec.admin_key,
                share_prefix_cache=spec.share_prefix_cache,
                redact=spec.redact,
            )
            self.ingresses = []
            for i in range(spec.ingresses):
                ingress_id = f"ziggurat-ingress-{tag}-{i}"
                # Ingresses share the port of this (the driver's) node.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self.ingresses.append(IngressActor.options(name=ingress_id, scheduling_strategy=here).remote(
                    icfg, ingress_id, self.router_name, self.scheduler_names, self.meter_name))
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


def serve(**kwargs) -> Deployment:
    """Start a deployment from a driver script (works under `ray job submit`)."""
    ensure_ray()
    return Deployment(DeploymentSpec(**kwargs))
