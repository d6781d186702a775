"""Request traces (OpenTelemetry): one trace per request, a span from every layer it crosses.

    ingress  POST /v1/...        (SERVER; parent: the client's W3C traceparent, if it sent one)
      router.route
      scheduler.queue            arrival -> first scheduled       (recorded by the replica that ends the request)
      prefill                    first scheduled -> first token
      kv_transfer                the decode replica's pull (prefill/decode only)
      decode                     first token -> the end
      metering.record            usage event queued -> committed by the Meter

Spans travel between actors as W3C trace-context carriers ({"traceparent": ...})
inside the typed messages (SubmitRequest.trace). The scheduler's spans are
recorded when the request ends, with the times it kept anyway, so the step
loop never touches the tracer. Attributes follow the OpenTelemetry GenAI
conventions (gen_ai.operation.name, gen_ai.request.model,
gen_ai.usage.input_tokens, ...).

Off by default (EngineConfig.otlp_traces_endpoint None): `Tracing(None)` is
a no-op whose methods return at once. Endpoints: `console`, `file:///path`
(JSON lines, one span each: tests), or an OTLP/HTTP collector URL
(`http://collector:4318/v1/traces`, needs opentelemetry-exporter-otlp-proto-http).
"""

from __future__ import annotations

import json
import threading
import time


class Tracing:
    def __init__(self, endpoint: str | None = None, service: str = "ziggurat"):
        self.enabled = bool(endpoint)
        self.endpoint = endpoint
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._prop = TraceContextTextMapPropagator()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if endpoint == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            self.provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif endpoint.startswith("file://"):
            self.provider.add_span_processor(SimpleSpanProcessor(_JsonLines(endpoint.removeprefix("file://"))))
        elif endpoint.startswith(("http://", "https://")):
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise ValueError("otlp_traces_endpoint: an OTLP endpoint needs opentelemetry-exporter-otlp-proto-http "
                                 "(pip install 'ziggurat[otlp]')") from None
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        else:
            raise ValueError(f"otlp_traces_endpoint: {endpoint!r} is not console, file:///path or an http(s):// URL")
        self.tracer = self.provider.get_tracer("ziggurat")

    # -- spans -------------------------------------------------------------------------

    def start(self, name: str, parent: dict | None = None, attributes: dict | None = None, server: bool = False):
        """A live span (end it with `end`), or None when tracing is off."""
        if not self.enabled:
            return None
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(name, context=self._ctx(parent), attributes=attributes or {},
                                      kind=SpanKind.SERVER if server else SpanKind.INTERNAL)

    def end(self, span, attributes: dict | None = None) -> None:
        if span is not None:
            if attributes:
                span.set_attributes({k: v for k, v in attributes.items() if v is not None})
            span.end()

    def record(self, name: str, parent: dict | None, start_s: float, end_s: float,
               attributes: dict | None = None) -> None:
        """A finished span from wall-clock times (seconds), under `parent` (a carrier)."""
        if not self.enabled or parent is None:
            return
        span = self.tracer.start_span(name, context=self._ctx(parent), start_time=int(start_s * 1e9),
                                      attributes={k: v for k, v in (attributes or {}).items() if v is not None})
        span.end(end_time=int(max(end_s, start_s) * 1e9))

    def carrier(self, span) -> dict | None:
        """The W3C trace-context of `span`, to put in a message."""
        if span is None:
            return None
        from opentelemetry import trace

        out: dict = {}
        self._prop.inject(out, context=trace.set_span_in_context(span))
        return out

    def extract(self, headers) -> dict | None:
        """A client's trace context from HTTP headers (its traceparent), as a carrier."""
        if not self.enabled:
            return None
        tp = headers.get("traceparent")
        if not tp:
            return None
        out = {"traceparent": tp}
        if headers.get("tracestate"):
            out["tracestate"] = headers.get("tracestate")
        return out

    def _ctx(self, carrier):
        return self._prop.extract(carrier) if carrier else None

    def shutdown(self) -> None:
        if self.enabled:
            self.provider.shutdown()


class _JsonLines:
    """A span exporter appending one JSON object per span to a file (O_APPEND: several
    processes can share it)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            ctx, parent = s.get_span_context(), s.parent
            lines.append(json.dumps({
                "name": s.name, "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                "start": s.start_time / 1e9, "end": s.end_time / 1e9,
                "service": s.resource.attributes.get("service.name"), "attributes": dict(s.attributes or {})}))
        with self._lock, open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def now() -> float:
    return time.time()
