"""The metrics registry: every quantity ziggurat exports, named once.

Two exporters read the same table:
  * the ingress's `/metrics` (Prometheus text, scraped from the replicas'
    ReplicaStats and the ingress's own counters): `render_prometheus`;
  * the Ray dashboard (ray.util.metrics, pushed by each scheduler actor
    from its ReplicaStats): `RayExporter`.

A quantity has one base name. Counters appear as `<name>_total` in both, as
Prometheus requires; Ray's metrics agent prefixes what it exports with
`ray_`, so `ziggurat_engine_steps` is `ziggurat_engine_steps_total` on
/metrics and `ray_ziggurat_engine_steps_total` on the dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "gauge" | "counter"
    help: str
    stat: str | None = None  # the ReplicaStats attribute it reads (replica metrics)

    @property
    def exported_name(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name


def _g(name, help_, stat=None):
    return Metric("ziggurat_" + name, "gauge", help_, stat)


def _c(name, help_, stat=None):
    return Metric("ziggurat_" + name, "counter", help_, stat)


# Per replica, labelled {replica}: from ReplicaStats.
REPLICA = (
    _g("num_requests_running", "Requests in the running batch.", "num_running"),
    _g("num_requests_waiting", "Requests queued for scheduling.", "num_waiting"),
    _g("kv_cache_usage", "Fraction of KV blocks in use.", "kv_usage"),
    _g("kv_free_blocks", "KV blocks not referenced by any request.", "num_free_blocks"),
    _g("kv_total_blocks", "KV blocks in the cache.", "num_blocks"),
    _g("unacked_usage_events", "Usage events not yet committed to the ledger.", "unacked_usage_events"),
    _c("preemptions", "Requests preempted.", "num_preemptions"),
    _c("engine_steps", "Scheduler steps run.", "steps"),
    _c("prompt_tokens", "Prompt tokens of finished requests.", "prompt_tokens"),
    _c("cached_prompt_tokens", "Prompt tokens served from the prefix cache.", "cached_tokens"),
    _c("generation_tokens", "Generated tokens.", "generation_tokens"),
)

# Per ingress (its own view).
HTTP_REQUESTS = _c("http_requests", "HTTP requests answered, by status.")
INFLIGHT = _g("inflight_requests", "Engine requests this ingress is waiting on.")
UNREACHABLE = _g("replicas_unreachable", "Replicas that did not answer this scrape.")
INGRESS = (HTTP_REQUESTS, INFLIGHT, UNREACHABLE)

ALL = REPLICA + INGRESS

Sample = tuple[Metric, dict, float]


def replica_samples(stats) -> list[Sample]:
    """Samples of every replica metric for a list of ReplicaStats."""
    return [(m, {"replica": str(s.replica)}, getattr(s, m.stat)) for m in REPLICA for s in stats]


def render_prometheus(samples: list[Sample]) -> str:
    """Prometheus text exposition (format 0.0.4), grouped by metric in registry order."""
    by_metric: dict[Metric, list[tuple[dict, float]]] = {m: [] for m in ALL}
    for m, labels, value in samples:
        by_metric.setdefault(m, []).append((labels, value))
    lines = []
    for m, rows in by_metric.items():
        if not rows:
            continue
        name = m.exported_name
        lines.append(f"# HELP {name} {m.help}")
        lines.append(f"# TYPE {name} {m.kind}")
        for labels, value in rows:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")
    return "\n".join(lines) + "\n"


class RayExporter:
    """The replica metrics as Ray metrics (Ray's agent serves them to Prometheus and the dashboard)."""

    def __init__(self, replica: int):
        from ray.util.metrics import Counter, Gauge  # only the actor process that exports needs Ray

        self.tags = {"replica": str(replica)}
        self.metrics = {m: (Gauge if m.kind == "gauge" else Counter)(m.name, m.help, tag_keys=("replica",))
                        for m in REPLICA}
        self.last: dict[str, float] = {}

    def update(self, stats) -> None:
        for m, metric in self.metrics.items():
            value = getattr(stats, m.stat)
            if m.kind == "gauge":
                metric.set(value, tags=self.tags)
            else:  # Ray counters take increments
                prev = self.last.get(m.name, 0)
                if value > prev:
                    metric.inc(value - prev, tags=self.tags)
                self.last[m.name] = value
