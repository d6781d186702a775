"""DeploymentSpec: what a deployment is, each setting defined once.

    DeploymentSpec
      engine:  EngineConfig   (config.py: every engine knob, for every replica)
      ingress: IngressConfig  (actors/ingress/server.py: the HTTP front door)
      health:  HealthConfig   (how the supervisor judges replicas)
      replicas, ingresses, max_waiting, worker_cls, db   (the deployment's own)

`DeploymentSpec.from_flat(model=..., tensor_parallel_size=2, port=8000, ...)`
takes the fields of all three by name (what `ziggurat.cluster.deploy.serve`
and driver scripts pass); a name that none of them has is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ziggurat.actors.ingress.server import IngressConfig
from ziggurat.config import EngineConfig


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


@dataclass
class DeploymentSpec:
    engine: EngineConfig
    ingress: IngressConfig = field(default_factory=IngressConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    replicas: int = _opt(1, "replicas of the model (each a scheduler and a TP group of workers)")
    ingresses: int = _opt(1, "HTTP actors sharing the port (spread HTTP/SSE work over cores)")
    max_waiting: int | None = _opt(None, "queued requests per replica before 429 (default: 4 x max_num_seqs)")
    # The worker implementation, as "module:Class" (a zero-cost worker for
    # control-plane benchmarks, say).
    worker_cls: str = _opt("ziggurat.models.worker:Worker", "the worker class, as module:Class")
    # The ledger/tenant database: a SQLite path or a postgresql:// URL (None: <cache>/tenancy.db).
    db: str | None = _opt(None, "ledger: SQLite path or postgresql:// URL (default: ~/.cache/ziggurat/tenancy.db)")

    def __post_init__(self) -> None:
        for name in ("replicas", "ingresses"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")

    @property
    def db_url(self) -> str:
        return ledger_url(self.db)

    @property
    def journal_path(self) -> Path:
        """Where schedulers journal unacknowledged usage events (per deployment, per replica)."""
        return cache_dir() / "usage-journal"

    @classmethod
    def from_flat(cls, **kw) -> "DeploymentSpec":
        """One keyword per field of EngineConfig, IngressConfig or the spec itself;
        model=None serves the embedded default model."""
        eng = {f.name for f in fields(EngineConfig)}
        ing = {f.name for f in fields(IngressConfig)}
        hea = {f.name for f in fields(HealthConfig)}
        own = {f.name for f in fields(cls)} - {"engine", "ingress", "health"}
        unknown = set(kw) - eng - ing - hea - own
        if unknown:
            raise TypeError(f"unknown deployment setting(s): {', '.join(sorted(unknown))}")
        e = {k: v for k, v in kw.items() if k in eng}
        if e.get("model") is None:
            e["model"] = str(default_model_dir())
        i = {k: v for k, v in kw.items() if k in ing}
        if "api_keys" in i:
            i["api_keys"] = tuple(i["api_keys"])
        h = {k: v for k, v in kw.items() if k in hea}
        return cls(engine=EngineConfig(**e), ingress=IngressConfig(**i), health=HealthConfig(**h),
                   **{k: v for k, v in kw.items() if k in own})
