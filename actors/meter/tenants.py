"""Tenants and their API keys.

A key looks like `zk-<key_id>-<secret>`. Only a salted HMAC-SHA256 of the
whole key is stored, with the key id in clear for lookup; the key itself is
returned once, at creation, and never stored or logged. Verification
compares digests in constant time. Keys are high-entropy random strings, so
a fast keyed hash is the right tool (as for other bearer tokens); a slow
password hash would only add latency to every request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass

from ziggurat.actors.meter.store import Store

KEY_PREFIX = "zk-"


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    name: str
    created_at: float
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_token_cap: int | None = None
    monthly_spend_cap: float | None = None
    log_requests: bool = False
    log_retention_days: int = 30


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant_id: str
    salt: str
    key_hash: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    models: tuple[str, ...] | None
    requests_per_minute: int | None
    tokens_per_minute: int | None

    def public(self) -> dict:
        """What may be shown: never the hash or salt."""
        return {"key_id": self.key_id, "tenant_id": self.tenant_id, "created_at": self.created_at,
                "expires_at": self.expires_at, "revoked_at": self.revoked_at,
                "models": list(self.models) if self.models else None,
                "requests_per_minute": self.requests_per_minute, "tokens_per_minute": self.tokens_per_minute}


@dataclass(frozen=True)
class Principal:
    """Who a request is from, once authenticated."""

    tenant_id: str
    key_id: str | None
    models: tuple[str, ...] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def hash_key(key: str, salt: str) -> str:
    return hmac.new(bytes.fromhex(salt), key.encode(), hashlib.sha256).hexdigest()


def key_id_of(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    parts = key[len(KEY_PREFIX):].split("-", 1)
    return parts[0] if len(parts) == 2 and parts[0] else None


class TenantError(ValueError):
    pass


_TENANT_COLS = "tenant_id, name, created_at, requests_per_minute, tokens_per_minute, monthly_token_cap, " \
               "monthly_spend_cap, log_requests, log_retention_days"
_KEY_COLS = "key_id, tenant_id, salt, key_hash, created_at, expires_at, revoked_at, models, " \
            "requests_per_minute, tokens_per_minute"


class TenantStore:
    def __init__(self, store: Store):
        self.store = store

    # -- tenants ----------------------------------------------------------------------------

    def create_tenant(self, name: str, **limits) -> Tenant:
        if not name or not isinstance(name, str):
            raise TenantError("name: a tenant needs a non-empty name")
        if self.find_tenant(name) is not None:
            raise TenantError(f"name: tenant {name!r} already exists")
        t = Tenant(tenant_id=uuid.uuid4().hex[:12], name=name, created_at=time.time(), **self._limits(limits))
        self.store.execute(f"INSERT INTO tenants ({_TENANT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", self._row(t))
        return t

    def update_tenant(self, tenant: str, **limits) -> Tenant:
        t = self.get_tenant(tenant)
        t = Tenant(**{**t.__dict__, **self._limits(limits)})
        self.store.execute(
            "UPDATE tenants SET requests_per_minute = ?, tokens_per_minute = ?, monthly_token_cap = ?, "
            "monthly_spend_cap = ?, log_requests = ?, log_retention_days = ? WHERE tenant_id = ?",
            self._row(t)[3:] + (t.tenant_id,))
        return t

    @staticmethod
    def _limits(limits: dict) -> dict:
        allowed = {"requests_per_minute", "tokens_per_minute", "monthly_token_cap", "monthly_spend_cap",
                   "log_requests", "log_retention_days"}
        for k, v in limits.items():
            if k not in allowed:
                raise TenantError(f"{k}: not a tenant setting (one of {', '.join(sorted(allowed))})")
            if v is not None and k != "log_requests" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise TenantError(f"{k}: must be a non-negative number, got {v!r}")
        return limits

    @staticmethod
    def _row(t: Tenant) -> tuple:
        return (t.tenant_id, t.name, t.created_at, t.requests_per_minute, t.tokens_per_minute, t.monthly_token_cap,
                t.monthly_spend_cap, int(bool(t.log_requests)), t.log_retention_days)

    def find_tenant(self, tenant: str) -> Tenant | None:
        rows = self.store.query(f"SELECT {_TENANT_COLS} FROM tenants WHERE tenant_id = ? OR name = ?", (tenant, tenant))
        if not rows:
            return None
        r = rows[0]
        return Tenant(*r[:7], log_requests=bool(r[7]), log_retention_days=r[8])

    def get_tenant(self, tenant: str) -> Tenant:
        t = self.find_tenant(tenant)
        if t is None:
            raise TenantError(f"tenant: no tenant with id or name {tenant!r}")
        return t

    def tenants(self) -> list[Tenant]:
        rows = self.store.query(f"SELECT {_TENANT_COLS} FROM tenants ORDER BY created_at")
        return [Tenant(*r[:7], log_requests=bool(r[7]), log_retention_days=r[8]) for r in rows]

    # -- keys -------------------------------------------------------------------------------------

    def create_key(self, tenant: str, expires_in_s: float | None = None, models: list[str] | None = None,
                   requests_per_minute: int | None = None, tokens_per_minute: int | None = None) -> tuple[str, KeyRecord]:
        """Returns (the key, shown this once; its record)."""
        if not isinstance(tenant, str):
            raise TenantError(f"tenant: must be a tenant id or name, got {tenant!r}")
        if models is not None and (not isinstance(models, (list, tuple)) or not models
                                   or not all(isinstance(m, str) and m for m in models)):
            raise TenantError(f"models: must be a non-empty list of model names, got {models!r}")
        for name, v in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise TenantError(f"{name}: must be a non-negative integer, got {v!r}")
        if expires_in_s is not None and (isinstance(expires_in_s, bool) or not isinstance(expires_in_s, (int, float))
                                         or expires_in_s <= 0):
            raise TenantError(f"expires_in_days: must be a positive number, got {expires_in_s!r}")
        t = self.get_tenant(tenant)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        salt = secrets.token_hex(16)
        now = time.time()
        rec = KeyRecord(key_id, t.tenant_id, salt, hash_key(key, salt), now,
                        now + expires_in_s if expires_in_s else None, None, tuple(models) if models else None,
                        requests_per_minute, tokens_per_minute)
        self.store.execute(
            f"INSERT INTO api_keys ({_KEY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.key_id, rec.tenant_id, rec.salt, rec.key_hash, rec.created_at, rec.expires_at, None,
             json.dumps(list(models)) if models else None, requests_per_minute, tokens_per_minute))
        return key, rec

    def revoke_key(self, key_id: str) -> bool:
        return self.store.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                  (time.time(), key_id)) > 0

    def get_key(self, key_id: str) -> KeyRecord | None:
        rows = self.store.query(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,))
        if not rows:
            return None
        r = list(rows[0])
        r[7] = tuple(json.loads(r[7])) if r[7] else None
        return KeyRecord(*r)

    def keys(self, tenant: str | None = None) -> list[KeyRecord]:
        ids = [r[0] for r in self.store.query(
            "SELECT key_id FROM api_keys" + (" WHERE tenant_id = ?" if tenant else "") + " ORDER BY created_at",
            (self.get_tenant(tenant).tenant_id,) if tenant else ())]
        return [self.get_key(i) for i in ids]

    def has_keys(self) -> bool:
        return bool(self.store.query("SELECT 1 FROM api_keys LIMIT 1"))


def verify(key: str, rec: KeyRecord | None, now: float | None = None) -> str | None:
    """None if `key` is valid for `rec`, else the reason it is not."""
    if rec is None:
        return "unknown key"
    if not hmac.compare_digest(hash_key(key, rec.salt), rec.key_hash):
        return "unknown key"
    now = time.time() if now is None else now
    if rec.revoked_at is not None:
        return "key revoked"
    if rec.expires_at is not None and now >= rec.expires_at:
        return "key expired"
    return None
