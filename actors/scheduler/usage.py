"""UsageBook: a replica's metering, one usage event per request that reached it.

A request is opened when the scheduler takes it and closed exactly once,
however it ends (finished, stopped, aborted, failed); closing appends its
UsageEvent to the outbox, where it stays until the Meter acknowledges it
(the actor's flusher thread delivers it, retrying; the ledger ignores ids it
already holds, so a retry never counts twice). The book also keeps this
replica's own per-tenant totals, for reconciliation with the ledger.

With a journal file, every event is also appended there when it is made and
the file is emptied once everything in it is acknowledged: a scheduler killed
with events still unacknowledged leaves them on disk, and its successor
(under the same replica name) sends them again at start-up (`recover`).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ziggurat.actors.meter.messages import UsageEvent
from ziggurat.actors.scheduler.messages import SubmitRequest


@dataclass
class _Open:
    submit: SubmitRequest
    arrived: float  # wall-clock time the scheduler took it
    first_token: float | None = None
    prefill_replica: int | None = None  # a decode hand-off: where the prompt was computed
    scheduled: float | None = None  # wall clock, first admitted to a batch (request_queue_time)


class UsageBook:
    def __init__(self, replica: int, gpu_type: str = "cpu", journal: str | Path | None = None, metrics=None,
                 tracing=None):
        """metrics: an actors.metrics.RequestMetrics to observe each request's end into;
        tracing: an actors.tracing.Tracing to record the request's scheduler spans into."""
        self.replica, self.gpu_type, self.metrics = replica, gpu_type, metrics
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self._traced: dict[str, tuple[dict, float]] = {}  # request -> (trace carrier, queued at): metering spans
        self.open: dict[str, _Open] = {}
        self.outbox: collections.deque[UsageEvent] = collections.deque()
        self.tenant_totals: dict[str, dict] = {}
        self.journal = Path(journal) if journal else None
        self._jlock = threading.Lock()
        self._jfile = None
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self.recovered = self.recover()
            self._jfile = open(self.journal, "a", buffering=1)

    def recover(self) -> int:
        """Queue the events a predecessor journaled and never saw acknowledged."""
        if self.journal is None or not self.journal.is_file():
            return 0
        n = 0
        for line in self.journal.read_text().splitlines():
            try:
                self.outbox.append(UsageEvent(**json.loads(line)))
                n += 1
            except (ValueError, TypeError):  # a line cut short by the kill
                continue
        return n

    def _queue(self, e: UsageEvent) -> None:
        with self._jlock:  # journal and outbox change together (ack empties the journal under this lock)
            if self._jfile is not None:
                self._jfile.write(json.dumps(asdict(e)) + "\n")  # a kill leaves it in the page cache
            self.outbox.append(e)

    def start(self, sub: SubmitRequest, prefill_replica: int | None = None, first_token_at: float | None = None,
              arrived: float | None = None, scheduled: float | None = None) -> None:
        self.open[sub.request_id] = _Open(sub, arrived or time.time(), first_token_at, prefill_replica, scheduled)

    def scheduled(self, request_id: str, now: float) -> None:
        entry = self.open.get(request_id)
        if entry is not None and entry.scheduled is None:
            entry.scheduled = now

    def first_token(self, request_id: str, now: float) -> None:
        entry = self.open.get(request_id)
        if entry is not None and entry.first_token is None:
            entry.first_token = now

    def close(self, rid: str, prompt: int, cached: int, completion: int, status: str) -> None:
        """End a request's metering (a request already closed, or never opened, is ignored)."""
        entry = self.open.pop(rid, None)
        if entry is None:
            return
        sub = entry.submit
        now = time.time()
        if self.metrics is not None:
            self.metrics.request_done(status, entry.arrived, entry.scheduled, entry.first_token, now, prompt,
                                      completion)
        if self.tracing is not None and sub.trace:
            self._spans(sub, entry, now, status, prompt, cached, completion)
        if not sub.bill_prompt:  # n > 1: only the first sample of a prompt bills the prompt
            prompt = cached = 0
        event = UsageEvent(
            request_id=rid, http_request_id=sub.http_request_id, tenant=sub.tenant, key_id=sub.key_id,
            model=sub.model, lora=sub.lora, replica=self.replica, gpu_type=self.gpu_type, prompt_tokens=prompt,
            cached_tokens=cached, completion_tokens=completion, status=status, arrived_at=entry.arrived,
            finished_at=now, ttft_ms=(entry.first_token - entry.arrived) * 1e3 if entry.first_token else None,
            duration_ms=(now - entry.arrived) * 1e3, prefill_replica=entry.prefill_replica)
        self._queue(event)
        t = self.tenant_totals.setdefault(sub.tenant, {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0,
                                                       "completion_tokens": 0})
        t["requests"] += 1
        t["prompt_tokens"] += prompt
        t["cached_tokens"] += cached
        t["completion_tokens"] += completion

    def _spans(self, sub, entry: _Open, now: float, status: str, prompt: int, cached: int, completion: int) -> None:
        t, tr = self.tracing, sub.trace
        attrs = {"ziggurat.replica": self.replica, "ziggurat.prefill_replica": entry.prefill_replica}
        sched = entry.scheduled or entry.arrived
        t.record("scheduler.queue", tr, entry.arrived, sched, attrs)
        if entry.first_token is not None:
            t.record("prefill", tr, sched, entry.first_token, {**attrs, "gen_ai.usage.input_tokens": prompt,
                                                                "ziggurat.cached_tokens": cached})
        t.record("decode", tr, entry.first_token or sched, now, {**attrs, "gen_ai.usage.output_tokens": completion,
                                                                  "ziggurat.status": status})
        self._traced[sub.request_id] = (tr, now)

    def discard(self, rid: str) -> None:
        """Forget a request without an event (it was refused as a whole: nobody is billed)."""
        self.open.pop(rid, None)

    def take(self, max_events: int = 512) -> list[UsageEvent]:
        """The oldest unacknowledged events (they stay queued until `ack`)."""
        return [self.outbox[i] for i in range(min(max_events, len(self.outbox)))]

    def ack(self, n: int) -> None:
        with self._jlock:
            for _ in range(n):
                e = self.outbox.popleft()
                if self._traced:
                    traced = self._traced.pop(e.request_id, None)
                    if traced is not None:  # committed by the Meter now
                        self.tracing.record("metering.record", traced[0], traced[1], time.time(),
                                            {"ziggurat.status": e.status})
            if self._jfile is not None and not self.outbox:  # everything journaled is acknowledged
                self._jfile.truncate(0)
