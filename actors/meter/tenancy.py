"""TenantPlane: everything the Meter actor owns, as one plain object over one
Store: the usage ledger, tenants and keys, prices, and request/response logs
(stored apart from usage, with their own per-tenant retention, off unless a
tenant turns them on)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict

from ziggurat.actors.meter.ledger import Ledger, Price, month_start
from ziggurat.actors.meter.messages import UsageEvent
from ziggurat.actors.meter.store import Store
from ziggurat.actors.meter.tenants import Principal, TenantStore, key_id_of, verify


class TenantPlane:
    def __init__(self, url: str):
        self.store = Store.open(url)
        self.ledger = Ledger(self.store)
        self.tenants = TenantStore(self.store)

    # -- hot-path helpers (answers are cached by ingresses) ----------------------------------

    def authenticate(self, key: str) -> tuple[Principal | None, str | None]:
        kid = key_id_of(key)
        rec = self.tenants.get_key(kid) if kid else None
        why = verify(key, rec)
        if why is not None:
            return None, why
        return Principal(rec.tenant_id, rec.key_id, rec.models, rec.requests_per_minute, rec.tokens_per_minute), None

    def tenant_limits(self, tenant_id: str) -> dict | None:
        t = self.tenants.find_tenant(tenant_id)
        return asdict(t) if t else None

    def month_usage(self, tenant_ids: list[str]) -> dict[str, tuple[int, float]]:
        since = month_start()
        return {t: tuple(reversed(self.ledger.spend_and_tokens(t, since))) for t in tenant_ids}

    def has_keys(self) -> bool:
        return self.tenants.has_keys()

    # -- metering ---------------------------------------------------------------------------------

    def record(self, events: list[UsageEvent]) -> int:
        return self.ledger.record(events)

    # -- request/response logs -----------------------------------------------------------------

    def log_request(self, request_id: str, tenant: str, request: dict, response: dict) -> None:
        self.store.execute(
            "INSERT INTO request_logs (request_id, tenant, created_at, request, response) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (request_id) DO NOTHING",
            (request_id, tenant, time.time(), json.dumps(request), json.dumps(response)))

    def logs(self, tenant: str, request_id: str | None = None, limit: int = 100) -> list[dict]:
        t = self.tenants.get_tenant(tenant)
        sql = "SELECT request_id, created_at, request, response FROM request_logs WHERE tenant = ?"
        params: tuple = (t.tenant_id,)
        if request_id:
            sql += " AND request_id = ?"
            params += (request_id,)
        rows = self.store.query(sql + f" ORDER BY created_at DESC LIMIT {int(limit)}", params)
        return [{"request_id": r[0], "created_at": r[1], "request": json.loads(r[2]), "response": json.loads(r[3])}
                for r in rows]

    def purge_logs(self, now: float | None = None) -> int:
        """Apply each tenant's retention to its request logs."""
        now = time.time() if now is None else now
        n = 0
        for t in self.tenants.tenants():
            n += self.store.execute("DELETE FROM request_logs WHERE tenant = ? AND created_at < ?",
                                    (t.tenant_id, now - t.log_retention_days * 86400))
        return n

    # -- admin ------------------------------------------------------------------------------------

    def set_price(self, model: str, input_per_mtok: float, cached_input_per_mtok: float, output_per_mtok: float) -> None:
        self.ledger.set_price(Price(model, input_per_mtok, cached_input_per_mtok, output_per_mtok))

    def usage(self, tenant: str | None, since: float = 0.0, until: float | None = None, by: str | None = None):
        tid = self.tenants.get_tenant(tenant).tenant_id if tenant else None
        return self.ledger.usage(tid, since, until, by)


_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_NUMBER = re.compile(r"\+?\d[\d\s().-]{7,}\d")


def redact_pii(record):
    """A redaction hook for request logs (`--redact ziggurat.actors.meter.tenancy:redact_pii`):
    replaces e-mail addresses and phone/card-like digit runs in every string."""
    if isinstance(record, str):
        return _NUMBER.sub("[NUMBER]", _EMAIL.sub("[EMAIL]", record))
    if isinstance(record, dict):
        return {k: redact_pii(v) for k, v in record.items()}
    if isinstance(record, list):
        return [redact_pii(v) for v in record]
    return record
