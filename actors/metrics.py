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

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    stat: str | None = None  # the ReplicaStats attribute it reads (replica metrics)
    buckets: tuple = ()  # histograms: upper bounds

    @property
    def exported_name(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name


class Histogram:
    """Cumulative bucket counts per label value, as Prometheus wants them (plain Python)."""

    def __init__(self, buckets: tuple):
        self.buckets = tuple(buckets)
        self.series: dict[str, list] = {}  # label value -> [count per bucket (cumulative), +Inf count, sum]

    def observe(self, value: float, label: str = "") -> None:
        s = self.series.setdefault(label, [0] * (len(self.buckets) + 1) + [0.0])
        for i, b in enumerate(self.buckets):
            if value <= b:
                s[i] += 1
        s[len(self.buckets)] += 1
        s[-1] += value

    def snapshot(self) -> dict:
        return {k: list(v) for k, v in self.series.items()}


def _g(name, help_, stat=None):
    return Metric("ziggurat_" + name, "gauge", help_, stat)


def _c(name, help_, stat=None):
    return Metric("ziggurat_" + name, "counter", help_, stat)


# Per replica, labelled {model_name, replica}: from ReplicaStats. Names and meanings
# follow vLLM's (vllm:num_requests_running is ziggurat_num_requests_running) where
# they overlap.
REPLICA = (
    _g("num_requests_running", "Requests in the running batch.", "num_running"),
    _g("num_requests_waiting", "Requests queued for scheduling.", "num_waiting"),
    _g("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", "kv_usage"),
    _g("kv_free_blocks", "KV blocks not referenced by any request.", "num_free_blocks"),
    _g("kv_total_blocks", "KV blocks in the cache.", "num_blocks"),
    _g("unacked_usage_events", "Usage events not yet committed to the ledger.", "unacked_usage_events"),
    _c("num_preemptions", "Requests preempted.", "num_preemptions"),
    _c("engine_steps", "Scheduler steps run.", "steps"),
    _c("prompt_tokens", "Prompt tokens of finished requests.", "prompt_tokens"),
    _c("generation_tokens", "Generated tokens.", "generation_tokens"),
    _c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache (of finished requests).",
       "prompt_tokens"),
    _c("prefix_cache_hits", "Prompt tokens found in the prefix cache (of finished requests).", "cached_tokens"),
    _g("kv_sending_requests", "Prefill side: requests whose KV is held for a decode replica.", "num_sending"),
    _g("kv_receiving_requests", "Decode side: hand-offs waiting for KV room or pulling.", "num_receiving"),
    _c("kv_transfers", "Decode side: KV pulls completed.", "kv_transfers"),
    _c("kv_transfer_failures", "Decode side: KV pulls that failed or missed their deadline.", "kv_transfer_failures"),
)
TRANSFER_SECONDS = Metric("ziggurat_kv_transfer_seconds", "histogram",
                          "Duration of one KV pull on one decode rank, by backend.", "kv_transfer_seconds_hist",
                          (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5, 10.0))
TRANSFER_BYTES = Metric("ziggurat_kv_transfer_bytes", "histogram",
                        "Bytes of one KV pull on one decode rank, by backend.", "kv_transfer_bytes_hist",
                        tuple(float(1 << k) for k in range(16, 34, 2)))
TRANSFER_BLOCKS = Metric("ziggurat_kv_transfer_blocks", "histogram", "KV blocks of one pull, by backend.",
                         "kv_transfer_blocks_hist", (1, 4, 16, 64, 256, 1024, 4096))
HISTOGRAMS = (TRANSFER_SECONDS, TRANSFER_BYTES, TRANSFER_BLOCKS)

# Per GPU (rank) of a replica, labelled {model_name, replica, rank}: NVML (topology/gpu_health.py).
GPU = (
    Metric("ziggurat_gpu_utilization_perc", "gauge", "GPU utilization (0-100).", "utilization"),
    Metric("ziggurat_gpu_memory_used_bytes", "gauge", "GPU memory in use.", "memory_used_bytes"),
    Metric("ziggurat_gpu_power_watts", "gauge", "GPU power draw.", "power_watts"),
    Metric("ziggurat_gpu_temperature_celsius", "gauge", "GPU temperature.", "temperature_c"),
    Metric("ziggurat_gpu_sm_clock_mhz", "gauge", "GPU SM clock.", "sm_clock_mhz"),
    Metric("ziggurat_gpu_ecc_uncorrected_errors", "gauge", "Uncorrected ECC errors (volatile).", "ecc_uncorrected"),
)

# Per tenant, labelled {model_name, replica, tenant}: finished requests and their tokens (ReplicaStats.tenant_totals,
# the replica's own counts: the ledger is the billing record).
TENANT = (
    Metric("ziggurat_tenant_requests", "counter", "Finished requests, by tenant.", "requests"),
    Metric("ziggurat_tenant_prompt_tokens", "counter", "Prompt tokens billed, by tenant.", "prompt_tokens"),
    Metric("ziggurat_tenant_cached_tokens", "counter", "Cached prompt tokens, by tenant.", "cached_tokens"),
    Metric("ziggurat_tenant_completion_tokens", "counter", "Completion tokens, by tenant.", "completion_tokens"),
)

# Finished requests, by finished_reason (stop, length, abort, error, ...): ReplicaStats.finished.
REQUEST_SUCCESS = _c("request_success", "Requests finished, by finished_reason.", "finished")

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0, 160.0, 640.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
        2.5, 5.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _h(name, help_, buckets):
    return Metric("ziggurat_" + name, "histogram", help_, "request_hist", buckets)


# Per request (observed when it ends, on the replica that owns it), labelled {model_name, replica}.
TTFT = _h("time_to_first_token_seconds", "Arrival to first token.", _LATENCY)
ITL = _h("inter_token_latency_seconds",
         "Between a replica's consecutive token-producing steps (one observation per step, not per token).", _ITL)
E2E = _h("e2e_request_latency_seconds", "Arrival to the end of the request.", _LATENCY)
QUEUE = _h("request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY)
PREFILL = _h("request_prefill_time_seconds", "First scheduled to first token.", _LATENCY)
DECODE = _h("request_decode_time_seconds", "First token to the end of the request.", _LATENCY)
PROMPT_TOKENS = _h("request_prompt_tokens", "Prompt tokens per request.", _TOKENS)
GENERATION_TOKENS = _h("request_generation_tokens", "Generated tokens per request.", _TOKENS)
REQUEST_HISTOGRAMS = (TTFT, ITL, E2E, QUEUE, PREFILL, DECODE, PROMPT_TOKENS, GENERATION_TOKENS)


class RequestMetrics:
    """A replica's per-request histograms and finish counts (plain Python: the scheduler
    loop observes, /metrics reads snapshots, the Ray exporter drains `pending`)."""

    def __init__(self) -> None:
        self.hists = {m.name: Histogram(m.buckets) for m in REQUEST_HISTOGRAMS}
        self.finished: dict[str, int] = {}
        self.pending: deque = deque(maxlen=65536)  # (metric name, value) not yet given to Ray

    def observe(self, m: Metric, value: float) -> None:
        self.hists[m.name].observe(value)
        self.pending.append((m.name, value))

    def request_done(self, reason: str, arrived: float, scheduled: float | None, first_token: float | None,
                     finished: float, prompt: int, completion: int) -> None:
        """Times are wall-clock seconds (None: never reached)."""
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.observe(E2E, max(finished - arrived, 0.0))
        self.observe(PROMPT_TOKENS, prompt)
        self.observe(GENERATION_TOKENS, completion)
        if scheduled is not None:
            self.observe(QUEUE, max(scheduled - arrived, 0.0))
        if first_token is not None:
            self.observe(TTFT, max(first_token - arrived, 0.0))
            self.observe(DECODE, max(finished - first_token, 0.0))
            if scheduled is not None:
                self.observe(PREFILL, max(first_token - scheduled, 0.0))

    def snapshot(self) -> dict:
        return {name: h.snapshot() for name, h in self.hists.items()}

# Per ingress (its own view).
HTTP_REQUESTS = _c("http_requests", "HTTP requests answered, by status.")
INFLIGHT = _g("inflight_requests", "Engine requests this ingress is waiting on.")
UNREACHABLE = _g("replicas_unreachable", "Replicas that did not answer this scrape.")
COLD_START = _g("cold_start_waiting_requests", "Requests waiting for a replica to start (autoscaling from zero).")
ROUTES = _c("routes", "Routing decisions, by kind: whole (one replica), pair (prefill/decode), none (no replica), "
                      "fallback (round robin: the router did not answer).")
USAGE_RECORDS = _g("usage_records_pending", "The ingress's own usage records (failures) not yet in the ledger.")
# A step's tokens from the scheduler's publish to this ingress putting them on their streams: the Ray call
# and the ingress's event loop (both clocks are wall clocks: on another host, add the clocks' offset).
TOKEN_DELIVERY = Metric("ziggurat_token_delivery_seconds", "histogram",
                        "A step's tokens, from the scheduler publishing them to this ingress dispatching them "
                        "to their streams.", None,
                        (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
INGRESS = (HTTP_REQUESTS, INFLIGHT, UNREACHABLE, COLD_START, ROUTES, USAGE_RECORDS, TOKEN_DELIVERY)

ALL = REPLICA + GPU + TENANT + (REQUEST_SUCCESS,) + REQUEST_HISTOGRAMS + HISTOGRAMS + INGRESS

Sample = tuple[Metric, dict, float]


def replica_samples(stats, model_name: str = "") -> list[Sample]:
    """Samples of every replica metric for a list of ReplicaStats."""
    lab = lambda s: {"model_name": model_name, "replica": str(s.replica)}  # noqa: E731
    out = [(m, lab(s), getattr(s, m.stat)) for m in REPLICA for s in stats]
    for s in stats:
        for g in getattr(s, "gpus", ()):
            for m in GPU:
                if m.stat in g:
                    out.append((m, {**lab(s), "rank": str(g["rank"])}, g[m.stat]))
        for reason, n in sorted(getattr(s, "finished", {}).items()):
            out.append((REQUEST_SUCCESS, {**lab(s), "finished_reason": reason}, n))
        for tenant, t in sorted(getattr(s, "tenant_totals", {}).items()):
            for m in TENANT:
                out.append((m, {**lab(s), "tenant": tenant}, t.get(m.stat, 0)))
        for m in REQUEST_HISTOGRAMS:  # one sample per series: its snapshot (render_prometheus expands it)
            series = getattr(s, "request_hist", {}).get(m.name, {}).get("")
            if series is not None:
                out.append((m, lab(s), series))
    for m in HISTOGRAMS:
        for s in stats:
            for backend, series in getattr(s, m.stat, {}).items():
                out.append((m, {**lab(s), "backend": backend}, series))
    return out


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
            if m.kind == "histogram":
                sep = "," if lab else ""
                for b, c in zip(m.buckets, value):
                    lines.append(f'{name}_bucket{{{lab}{sep}le="{float(b)!r}"}} {c}')  # as Ray writes it
                lines.append(f'{name}_bucket{{{lab}{sep}le="+Inf"}} {value[len(m.buckets)]}')
                lines.append(f"{name}_sum{{{lab}}} {value[-1]}")
                lines.append(f"{name}_count{{{lab}}} {value[len(m.buckets)]}")
                continue
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")
    return "\n".join(lines) + "\n"


class RayExporter:
    """The replica metrics as Ray metrics (Ray's agent serves them to Prometheus and the dashboard)."""

    def __init__(self, replica: int, model_name: str = ""):
        from ray.util.metrics import Counter, Gauge  # only the actor process that exports needs Ray

        from ray.util.metrics import Histogram as RayHistogram

        self.tags = {"model_name": model_name, "replica": str(replica)}
        keys = ("model_name", "replica")
        self.metrics = {m: (Gauge if m.kind == "gauge" else Counter)(m.name, m.help, tag_keys=keys)
                        for m in REPLICA}
        self.success = Counter(REQUEST_SUCCESS.name, REQUEST_SUCCESS.help, tag_keys=keys + ("finished_reason",))
        self.hists = {m: RayHistogram(m.name, m.help, boundaries=list(m.buckets), tag_keys=keys + ("backend",))
                      for m in HISTOGRAMS}
        self.request_hists = {m.name: RayHistogram(m.name, m.help, boundaries=list(m.buckets), tag_keys=keys)
                              for m in REQUEST_HISTOGRAMS}
        self.gpu = {m: Gauge(m.name, m.help, tag_keys=keys + ("rank",)) for m in GPU}
        self.tenant = {m: Counter(m.name, m.help, tag_keys=keys + ("tenant",)) for m in TENANT}
        self.last: dict[str, float] = {}
        self.last_transfer = 0

    def update(self, stats, request_metrics: "RequestMetrics | None" = None) -> None:
        if request_metrics is not None:
            pending = request_metrics.pending
            while pending:
                name, value = pending.popleft()
                self.request_hists[name].observe(value, tags=self.tags)
        for g in getattr(stats, "gpus", ()):
            for m, gauge in self.gpu.items():
                if m.stat in g:
                    gauge.set(g[m.stat], tags={**self.tags, "rank": str(g["rank"])})
        for tenant, t in getattr(stats, "tenant_totals", {}).items():
            for m, counter in self.tenant.items():
                key, value = f"tenant:{tenant}:{m.name}", t.get(m.stat, 0)
                if value > self.last.get(key, 0):
                    counter.inc(value - self.last.get(key, 0), tags={**self.tags, "tenant": tenant})
                    self.last[key] = value
        for reason, n in getattr(stats, "finished", {}).items():
            key = "finished:" + reason
            if n > self.last.get(key, 0):
                self.success.inc(n - self.last.get(key, 0), tags={**self.tags, "finished_reason": reason})
                self.last[key] = n
        # Histograms: observe the pulls not seen yet (stats carry the latest few, numbered).
        for n, backend, blocks, nbytes, seconds in getattr(stats, "recent_transfers", ()):
            if n <= self.last_transfer:
                continue
            self.last_transfer = n
            tags = {**self.tags, "backend": backend}
            self.hists[TRANSFER_SECONDS].observe(seconds, tags=tags)
            self.hists[TRANSFER_BYTES].observe(nbytes, tags=tags)
            self.hists[TRANSFER_BLOCKS].observe(blocks, tags=tags)
        for m, metric in self.metrics.items():
            value = getattr(stats, m.stat)
            if m.kind == "gauge":
                metric.set(value, tags=self.tags)
            else:  # Ray counters take increments
                prev = self.last.get(m.name, 0)
                if value > prev:
                    metric.inc(value - prev, tags=self.tags)
                self.last[m.name] = value
