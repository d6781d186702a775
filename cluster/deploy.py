"""Deploying a ziggurat endpoint on a Ray cluster.

    dep = ziggurat.cluster.deploy.serve(model="/models/llama", tensor_parallel_size=2, replicas=2, port=8000)
    print(dep.url)            # OpenAI-compatible endpoint
    dep.run_forever()         # or dep.shutdown()

For each replica: a STRICT_PACK placement group with one bundle per TP rank,
WorkerActors in it, and a SchedulerActor that drives them. RouterActors
(`routers`, fed alike by every scheduler) and IngressActors (HTTP) serve all
replicas. Replicas come in pools
(spec.PoolSpec): mixed, or prefill and decode, e.g.

    serve(model=..., prefill_replicas=1, decode_replicas=2, decode_tensor_parallel_size=1)
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
    def __init__(self, spec: DeploymentSpec, progress=None):
        """progress(line): start-up progress (the CLI prints it); None: quiet."""
        from ziggurat.actors.ingress.actor import IngressActor
        from ziggurat.actors.meter.actor import MeterActor
        from ziggurat.actors.router.actor import RouterActor
        from ziggurat.cluster.supervisor import SupervisorActor

        cfg = spec.engine
        if cfg.device is None:
            cfg = dataclasses.replace(cfg, device="cuda" if ray.cluster_resources().get("GPU", 0) else "cpu")
        use_gpu = cfg.device.startswith("cuda")
        icfg = spec.ingress
        if icfg.served_model_name is None:
            icfg = dataclasses.replace(icfg, served_model_name=_model_name(cfg.model))
        # All ingresses share one port; check it first, since SO_REUSEPORT would
        # otherwise quietly share it with another server.
        icfg = dataclasses.replace(icfg, port=icfg.port or _free_port(icfg.host))
        _check_port_free(icfg.host, icfg.port)
        self.spec = dataclasses.replace(spec, engine=cfg, ingress=icfg)
        tag = uuid.uuid4().hex[:8]
        self.db = spec.db_url
        # Named, so a (restartable) ingress takes names, not handles: Ray cannot
        # rebuild an actor whose constructor arguments are references (ray#53727).
        self.meter_name, self.router_name = f"ziggurat-meter-{tag}", f"ziggurat-router-{tag}"
        self.router_names = [self.router_name] + [f"ziggurat-router-{tag}-{i}" for i in range(1, spec.routers)]
        self.scheduler_names = [f"ziggurat-scheduler-{tag}-{r}" for r in range(spec.replicas)]
        self.meter = MeterActor.options(name=self.meter_name).remote(self.db)
        # Several routers share one view: every scheduler sends each its stats and KV events.
        self.routers = [RouterActor.options(name=n, max_restarts=-1).remote(
            spec.replicas, spec.roles, spec.pd_min_prompt_tokens, spec.router, cfg.block_size)
            for n in self.router_names]
        self.router = self.routers[0]
        names = dict(router=self.router_name, routers=self.router_names, meter=self.meter_name,
                     schedulers=self.scheduler_names,
                     journal_dir=str(spec.journal_path / tag))
        self.supervisor_name = f"ziggurat-supervisor-{tag}"
        self.supervisor = SupervisorActor.options(name=self.supervisor_name).remote(
            cfg, self.spec, names, use_gpu, **spec.health.__dict__)
        self.ingresses = []
        try:
            t0 = time.monotonic()
            if progress is not None:
                res = ray.cluster_resources()
                progress(f"cluster: {len([n for n in ray.nodes() if n['Alive']])} node(s), {res.get('CPU', 0):g} CPUs, "
                         f"{res.get('GPU', 0):g} GPUs")
            started = self.supervisor.start.remote()
            seen: dict = {}
            while True:
                done, _ = ray.wait([started], timeout=1.0)
                if progress is not None:
                    for s in ray.get(self.supervisor.status.remote()):
                        key = (s["phase"], s["detail"])
                        if s["phase"] and seen.get(s["replica"]) != key:
                            seen[s["replica"]] = key
                            progress(f"replica {s['replica']} ({s['role']}): {s['phase']}: {s['detail']} "
                                     f"[{time.monotonic() - t0:.0f} s]")
                if done:
                    break
            self.info = ray.get(started)
            # Every ingress checks requests against what every replica can hold.
            limits = min(self.info, key=lambda i: i.max_model_len)
            for i in range(spec.ingresses):
                ingress_id = f"ziggurat-ingress-{tag}-{i}"
                # Ingresses share the port of this (the driver's) node.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self.ingresses.append(IngressActor.options(name=ingress_id, scheduling_strategy=here).remote(
                    icfg, limits, ingress_id, self.router_names, self.scheduler_names, self.meter_name,
                    str(spec.journal_path / tag), cfg.otlp_traces_endpoint, self.supervisor_name,
                    spec.autoscaling.cold_start_timeout_s if any(p.scales and p.lo == 0 for p in spec.pools)
                    else 0.0))
            self.ingress = self.ingresses[0]
            ray.get([ing.url.remote() for ing in self.ingresses])  # all listening
            ray.get(self.supervisor.watch.remote(self.ingresses))
            self.url = ray.get(self.ingress.url.remote())
            self.open = ray.get(self.ingress.is_open.remote())
            self.served_model_name = icfg.served_model_name
            self.startup_seconds = time.monotonic() - t0
            if progress is not None:
                progress(f"ready in {self.startup_seconds:.1f} s")
        except BaseException:
            self.shutdown()
            raise

    @property
    def schedulers(self) -> list:
        """The replicas' current scheduler actors (a rebuilt replica has a new one)."""
        return [ray.get(self.supervisor.handles.remote(r))["scheduler"] for r in range(self.spec.replicas)]

    @property
    def workers(self) -> list[list]:
        return [ray.get(self.supervisor.handles.remote(r))["workers"] for r in range(self.spec.replicas)]

    def status(self) -> list[dict]:
        return ray.get(self.supervisor.status.remote())

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
        for actor in list(self.ingresses):
            try:
                ray.get(actor.shutdown.remote(), timeout=15)
            except Exception:
                pass
        try:
            ray.get(self.supervisor.shutdown.remote(), timeout=60)  # schedulers drain and meter what is left
        except Exception:
            pass
        for actor in list(self.ingresses) + list(getattr(self, "routers", [])) + [self.supervisor,
                                                                                   getattr(self, "meter", None)]:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        self.ingresses = []


def _model_name(model: str) -> str:
    """The name clients ask for by default: the directory's name, or a GGUF file's stem."""
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.name


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn binds: a socket of a stopped server still in TIME_WAIT does not block
        # the port (a restart right after a stop works); a listening one does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as e:
            raise RuntimeError(f"cannot serve on {host}:{port}: {e.strerror} (is another server using it?)") from None


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_ray(num_cpus: int | None = None, log_level: str | None = None) -> dict:
    """Join the cluster in RAY_ADDRESS, or start a local one. Returns its info.

    A local cluster has its node address and dashboard on loopback, and Ray's
    token authentication when RAY_AUTH_MODE=token was set before Ray was
    imported (`ziggurat serve` sets it; a driver script exports it). Ray 2.60
    still binds its gRPC servers (GCS, raylet, workers) to every interface, so
    the host must not let Ray's ports be reached from outside (README, "Security")."""
    if ray.is_initialized():
        return {"dashboard_url": None}
    # Every actor of this job reads its log level from the environment (actors/process.py).
    env = {"env_vars": {"ZIGGURAT_LOG_LEVEL": log_level}} if log_level else None
    if os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING, runtime_env=env)
    else:
        ctx = ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=True,
                       dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                       runtime_env=env)
    return {"dashboard_url": getattr(ctx, "dashboard_url", None)}


def serve(spec: DeploymentSpec | None = None, **kwargs) -> Deployment:
    """Start a deployment from a driver script (works under `ray job submit`):
    a DeploymentSpec, or its fields by name (DeploymentSpec.from_flat)."""
    spec = spec if spec is not None else DeploymentSpec.from_flat(**kwargs)
    ensure_ray(log_level=spec.log_level)
    return Deployment(spec)
