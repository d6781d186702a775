"""MeterActor: the serving path's door to the tenant plane, a thin shell over TenantPlane.

Schedulers record usage events through it and ingresses authenticate keys
and read limits through it. It is not the database's only writer: the
`ziggurat tenants|keys|prices` commands (cluster/tenant_cli.py) write the
same database directly, which SQLite in WAL mode and PostgreSQL allow.
Started with restarts enabled, so a killed Meter comes back on the same
durable store and producers simply retry unacknowledged events."""

from __future__ import annotations

from dataclasses import asdict

import ray

from ziggurat.actors.meter.tenancy import TenantPlane


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
class MeterActor:
    def __init__(self, url: str):
        self.plane = TenantPlane(url)

    # hot path (cached by ingresses)
    def record(self, events) -> int:
        """Durable before it returns: the producer may drop what was acknowledged."""
        return self.plane.record(events)

    def authenticate(self, key: str):
        return self.plane.authenticate(key)

    def tenant_limits(self, tenant_id: str):
        return self.plane.tenant_limits(tenant_id)

    def month_usage(self, tenant_ids: list[str]):
        return self.plane.month_usage(tenant_ids)

    def has_keys(self) -> bool:
        return self.plane.has_keys()

    def log_request(self, request_id: str, tenant: str, request: dict, response: dict) -> None:
        self.plane.log_request(request_id, tenant, request, response)

    # admin
    def create_tenant(self, name: str, **limits) -> dict:
        return asdict(self.plane.tenants.create_tenant(name, **limits))

    def update_tenant(self, tenant: str, **limits) -> dict:
        return asdict(self.plane.tenants.update_tenant(tenant, **limits))

    def list_tenants(self) -> list[dict]:
        return [asdict(t) for t in self.plane.tenants.tenants()]

    def create_key(self, tenant: str, **kw) -> dict:
        key, rec = self.plane.tenants.create_key(tenant, **kw)
        return dict(rec.public(), key=key)

    def revoke_key(self, key_id: str) -> bool:
        return self.plane.tenants.revoke_key(key_id)

    def list_keys(self, tenant: str | None = None) -> list[dict]:
        return [k.public() for k in self.plane.tenants.keys(tenant)]

    def set_price(self, model: str, input_per_mtok: float, cached_input_per_mtok: float, output_per_mtok: float) -> None:
        self.plane.set_price(model, input_per_mtok, cached_input_per_mtok, output_per_mtok)

    def usage(self, tenant: str | None = None, since: float = 0.0, until: float | None = None, by: str | None = None):
        return self.plane.usage(tenant, since, until, by)

    def totals(self) -> dict:
        return self.plane.ledger.totals()

    def event_ids(self) -> list[str]:
        return [r[0] for r in self.plane.store.query("SELECT request_id FROM usage_events")]

    def logs(self, tenant: str, request_id: str | None = None) -> list[dict]:
        return self.plane.logs(tenant, request_id)

    def purge_logs(self) -> int:
        return self.plane.purge_logs()
