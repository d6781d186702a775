"""UsageRecords: the ingress's own usage events, for requests cut off by a failure on our side.

When a replica dies or fails mid-request, the ingress is the one that knows
what each client actually received. It records one "replica_failed" event
per engine request that ended that way: the tokens its client received (the
prompt too, if any completion reached the client), nothing otherwise. The
ledger lets such a record supersede the scheduler's own event for the same
request, whatever it says (actors/meter/ledger.py).
Events are retried until the Meter acknowledges them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ziggurat.actors.ingress import refs
from ziggurat.actors.meter.messages import UsageEvent
from ziggurat.actors.scheduler.output_processor import RequestOutputs

log = logging.getLogger("ziggurat.ingress")


class UsageRecords:
    def __init__(self, meter=None):
        self.meter = meter
        self.pending: list[UsageEvent] = []
        self.recorded: list[UsageEvent] = []  # acknowledged (kept when there is no Meter: tests read them)
        self._wake: asyncio.Event | None = None

    def failed(self, outputs: RequestOutputs, meta: dict, replica: int | None, arrived: float) -> None:
        """One event per sample of `outputs` that ended with "error"."""
        now, n = time.time(), outputs.params.n
        for s in outputs.samples:
            if s.finish_reason != "error":
                continue
            got = s.delivered
            prompt = len(outputs.prompts[s.prompt_index]) if got and s.index % n == 0 else 0
            self.pending.append(UsageEvent(
                request_id=s.request_id, http_request_id=meta.get("http_request_id"), tenant=meta["tenant"],
                key_id=meta.get("key_id"), model=meta["model"], lora=meta.get("lora"), replica=replica, gpu_type=None,
                prompt_tokens=prompt, cached_tokens=min(s.num_cached_tokens, prompt), completion_tokens=got,
                status="replica_failed", arrived_at=arrived, finished_at=now, ttft_ms=None,
                duration_ms=(now - arrived) * 1e3))
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Deliver pending events until acknowledged (on the event loop, forever)."""
        self._wake = asyncio.Event()
        while True:
            if not self.pending:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = list(self.pending)
            try:
                if self.meter is not None:
                    await asyncio.wait_for(refs.result(self.meter.record.remote(batch)), 30)
                del self.pending[: len(batch)]
                self.recorded.extend(batch if self.meter is None else ())
            except Exception as e:  # the Meter restarting: retry (the ledger ignores what it holds)
                log.warning("ingress usage records not delivered (%s); retrying", type(e).__name__)
                await asyncio.sleep(0.5)
