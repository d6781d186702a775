"""The usage ledger: immutable usage events (metering), and rating on top.

Metering and rating are separate on purpose. Events hold only what happened
(tokens, status, times), keyed by the server's request id; `record` ignores
an id it already holds, so producers retry until acknowledged and a replay
changes nothing. Rating applies the price table at query time, so a price
change re-rates history without re-capturing anything.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import astuple, dataclass, fields

from ziggurat.actors.meter.messages import UsageEvent
from ziggurat.actors.meter.store import Store

# "replica_failed": recorded by the ingress for a request cut off by a failure on
# our side, with the tokens its client actually received; it supersedes the
# scheduler's own event for that request, whatever that says: the scheduler
# counts what it generated (an "error", or a normal ending reached while the
# ingress that would have streamed it was dead), the record what was delivered.
STATUSES = ("stop", "length", "aborted", "client_disconnected", "error", "replica_failed")


_COLUMNS = [f.name for f in fields(UsageEvent)]
_VALUES = f"INSERT INTO usage_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
_INSERT = _VALUES + "ON CONFLICT (request_id) DO NOTHING"
_SUPERSEDE = _VALUES + "ON CONFLICT (request_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _COLUMNS if c != "request_id")


@dataclass(frozen=True)
class Price:
    model: str
    input_per_mtok: float
    cached_input_per_mtok: float
    output_per_mtok: float


class Ledger:
    def __init__(self, store: Store):
        self.store = store

    # -- metering ----------------------------------------------------------------------

    def record(self, events: list[UsageEvent]) -> int:
        """Durably store events (one transaction each kind); returns how many were new
        or superseded. A request id already held is ignored, except that an
        ingress's "replica_failed" record replaces the event held for it."""
        for e in events:
            if e.status not in STATUSES:
                raise ValueError(f"usage event {e.request_id}: unknown status {e.status!r}")
        plain = [astuple(e) for e in events if e.status != "replica_failed"]
        records = [astuple(e) for e in events if e.status == "replica_failed"]
        return self.store.executemany(_INSERT, plain) + self.store.executemany(_SUPERSEDE, records)

    def events(self, tenant: str | None = None, since: float = 0.0, until: float | None = None) -> list[UsageEvent]:
        sql, params = self._where(tenant, since, until)
        rows = self.store.query(f"SELECT {', '.join(_COLUMNS)} FROM usage_events {sql} ORDER BY finished_at", params)
        return [UsageEvent(*r) for r in rows]

    def totals(self, tenant: str | None = None, since: float = 0.0, until: float | None = None) -> dict[str, dict]:
        """Per tenant: requests, prompt/cached/completion token sums."""
        sql, params = self._where(tenant, since, until)
        rows = self.store.query(
            "SELECT tenant, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens) "
            f"FROM usage_events {sql} GROUP BY tenant", params)
        return {t: {"requests": n, "prompt_tokens": int(p), "cached_tokens": int(c), "completion_tokens": int(o)}
                for t, n, p, c, o in rows}

    @staticmethod
    def _where(tenant, since, until) -> tuple[str, tuple]:
        clauses, params = ["finished_at >= ?"], [since]
        if until is not None:
            clauses.append("finished_at < ?")
            params.append(until)
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        return "WHERE " + " AND ".join(clauses), tuple(params)

    # -- rating --------------------------------------------------------------------------

    def set_price(self, p: Price) -> None:
        self.store.execute(
            "INSERT INTO prices (model, input_per_mtok, cached_input_per_mtok, output_per_mtok, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET input_per_mtok = excluded.input_per_mtok, "
            "cached_input_per_mtok = excluded.cached_input_per_mtok, output_per_mtok = excluded.output_per_mtok, "
            "updated_at = excluded.updated_at",
            (p.model, p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok, time.time()))

    def prices(self) -> dict[str, Price]:
        rows = self.store.query("SELECT model, input_per_mtok, cached_input_per_mtok, output_per_mtok FROM prices")
        return {r[0]: Price(*r) for r in rows}

    def usage(self, tenant: str | None = None, since: float = 0.0, until: float | None = None,
              by: str | None = None) -> list[dict]:
        """Rated usage rows grouped by tenant and `by` (model | key | day | None)."""
        if by not in (None, "model", "key", "day"):
            raise ValueError(f"by: must be model, key or day, got {by!r}")
        sql, params = self._where(tenant, since, until)
        rows = self.store.query(
            "SELECT tenant, model, key_id, finished_at, prompt_tokens, cached_tokens, completion_tokens "
            f"FROM usage_events {sql}", params)
        prices = self.prices()
        out: dict[tuple, dict] = {}
        for t, model, key_id, fin, p, c, o in rows:
            k = {"model": model, "key": key_id, "day": time.strftime("%Y-%m-%d", time.gmtime(fin)), None: ""}[by]
            row = out.setdefault((t, k), {"tenant": t, by or "all": k, "requests": 0, "prompt_tokens": 0,
                                          "cached_tokens": 0, "completion_tokens": 0, "cost": 0.0, "unpriced_tokens": 0})
            row["requests"] += 1
            row["prompt_tokens"] += p
            row["cached_tokens"] += c
            row["completion_tokens"] += o
            price = prices.get(model)
            if price is None:
                row["unpriced_tokens"] += p + o
            else:
                row["cost"] += ((p - c) * price.input_per_mtok + c * price.cached_input_per_mtok
                                + o * price.output_per_mtok) / 1e6
        return [out[k] for k in sorted(out, key=lambda k: (k[0], k[1] is not None, k[1] or ""))]  # key_id may be None

    def spend_and_tokens(self, tenant: str, since: float) -> tuple[float, int]:
        """Rated spend and total tokens of a tenant since a time (for monthly caps)."""
        rows = self.usage(tenant, since)
        return sum(r["cost"] for r in rows), sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def month_start(now: float | None = None) -> float:
    t = time.gmtime(now if now is not None else time.time())
    return time.mktime((t.tm_year, t.tm_mon, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
