"""Gatekeeper: the ingress's tenant checks, all answered from local caches.

- who: bearer key -> Principal (static keys from the command line map to the
  "default" tenant; `zk-` keys are looked up through the Meter once and then
  cached for `cache_ttl_s`, so revocation takes effect within that time);
  with no key configured anywhere the server is open and everything is the
  "default" tenant;
- may they: model allow-list, requests/tokens per minute, monthly caps
  (QuotaTracker; the ledger's month-to-date totals are pulled in the
  background, never on the request path);
- cache salt: prefix-cache blocks are keyed by a salt derived from the
  authenticated tenant, so tenants never share (or can probe) each other's
  cached prompts. A client's `cache_salt` is mixed in, never trusted alone.
  `share_prefix_cache=True` drops the tenant part (one shared cache for a
  public system prompt, at the cost of cross-tenant timing signals).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

from ziggurat.actors.meter.quota import Admission, Limits, QuotaExceeded, QuotaTracker, retry_after_header
from ziggurat.actors.meter.tenants import Principal, key_id_of
from ziggurat.actors.ingress import refs
from ziggurat.actors.ingress.protocol import APIError

log = logging.getLogger("ziggurat.gatekeeper")

DEFAULT_TENANT = "default"
METER_TIMEOUT_S = 10.0


def _tenant_plane_down(e: BaseException) -> APIError:
    log.warning("tenant plane unavailable (%s)", type(e).__name__)
    return APIError(503, "the tenant service is unavailable; retry", "service_unavailable", code="meter_unavailable",
                    headers={"Retry-After": "1"})


class Gatekeeper:
    def __init__(self, meter, static_keys: tuple[str, ...] = (), share_prefix_cache: bool = False,
                 cache_ttl_s: float = 5.0, refresh_s: float = 10.0):
        self.meter = meter
        self.static = [k.encode() for k in static_keys]
        self.share_prefix_cache = share_prefix_cache
        self.ttl, self.refresh_s = cache_ttl_s, refresh_s
        self.quota = QuotaTracker()
        self._principals: dict[bytes, tuple[float, Principal | None, str | None]] = {}
        self.max_cached_keys = 10_000
        self._limits: dict[str, tuple[float, Limits, bool]] = {}
        self._db_has_keys = (0.0, False)
        self._inflight: dict[str, int] = {}  # tenant -> tokens reserved by requests still running
        self._refresher: asyncio.Task | None = None

    @property
    def open(self) -> bool:
        return not self.static and not self._db_has_keys[1]

    async def start(self) -> None:
        if self.meter is not None:
            self._db_has_keys = (time.monotonic(), await refs.result(self.meter.has_keys.remote()))
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh_from_ledger()
            except Exception as e:  # the Meter may be restarting; counters stay approximate meanwhile
                log.warning("quota refresh from the ledger failed: %s", type(e).__name__)

    async def refresh_from_ledger(self) -> None:
        if self.meter is None:
            return
        self._db_has_keys = (time.monotonic(), await refs.result(self.meter.has_keys.remote()))
        tenants = list(self.quota.month)
        if tenants:
            usage = await refs.result(self.meter.month_usage.remote(tenants))
            for t, (tokens, spend) in usage.items():
                self.quota.refresh_month(t, tokens, spend, self._inflight.get(t, 0))

    # -- who ------------------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal:
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        if self.meter is not None and time.monotonic() - self._db_has_keys[0] > self.ttl:
            try:
                self._db_has_keys = (time.monotonic(),
                                     await refs.result(self.meter.has_keys.remote(), METER_TIMEOUT_S))
            except Exception as e:  # keep the last answer while the Meter restarts, if there is one
                if self._db_has_keys[0] == 0.0:
                    raise _tenant_plane_down(e) from None
                log.warning("key check against the ledger failed (%s); using the last answer", type(e).__name__)
        if self.open:
            return Principal(DEFAULT_TENANT, None)
        if not token:
            raise APIError(401, "Missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
        raw = token.encode()
        ok = False
        for k in self.static:  # every key compared: time does not depend on which matched
            ok |= hmac.compare_digest(raw, k)
        if ok:
            return Principal(DEFAULT_TENANT, "static")
        if self.meter is None or key_id_of(token) is None:
            raise APIError(401, "Incorrect API key", code="invalid_api_key")
        digest = hashlib.sha256(raw).digest()  # cache by digest: the key itself is never kept
        now = time.monotonic()
        hit = self._principals.get(digest)
        # Valid keys are trusted for `ttl`; unknown ones are re-checked after 1 s
        # at most once per key, and the cache is bounded (LRU).
        if hit is None or now - hit[0] > (self.ttl if hit[1] is not None else 1.0):
            try:
                principal, why = await refs.result(self.meter.authenticate.remote(token), METER_TIMEOUT_S)
            except Exception as e:  # the Meter restarting or unreachable: a retryable 503, not a 500
                raise _tenant_plane_down(e) from None
            hit = (now, principal, why)
            self._principals[digest] = hit
            while len(self._principals) > self.max_cached_keys:
                self._principals.pop(next(iter(self._principals)))
        else:
            self._principals[digest] = self._principals.pop(digest)  # most recently used last
        if hit[1] is None:
            raise APIError(401, f"Incorrect API key ({hit[2]})", code="invalid_api_key")
        return hit[1]

    # -- may they -------------------------------------------------------------------------------

    async def limits(self, tenant: str) -> Limits:
        hit = self._limits.get(tenant)
        if hit is None or time.monotonic() - hit[0] > self.ttl:
            rec = {}
            if self.meter is not None and tenant != DEFAULT_TENANT:
                try:
                    rec = await refs.result(self.meter.tenant_limits.remote(tenant), METER_TIMEOUT_S) or {}
                except Exception as e:
                    raise _tenant_plane_down(e) from None
            lim = Limits(**{k: rec.get(k) for k in ("requests_per_minute", "tokens_per_minute",
                                                    "monthly_token_cap", "monthly_spend_cap")})
            hit = (time.monotonic(), lim, bool(rec.get("log_requests")))
            self._limits[tenant] = hit
        return hit[1]

    def logs_requests(self, tenant: str) -> bool:
        hit = self._limits.get(tenant)
        return bool(hit and hit[2])

    async def admit(self, p: Principal, model: str, prompt_tokens: int, max_completion: int,
                    bounded: bool = True) -> Admission:
        """bounded=False: the request set no max_tokens, so max_completion is a guess;
        it is cut to what the tenant's and the key's minute windows allow, so a
        tenant whose limit is below the guess is not refused for the guess."""
        if p.models is not None and model not in p.models:
            raise APIError(403, f"this API key may not use model '{model}'", "permission_error", "model",
                           "model_not_allowed")
        tenant_limits = await self.limits(p.tenant_id)
        key_limits = Limits(requests_per_minute=p.requests_per_minute, tokens_per_minute=p.tokens_per_minute)
        if not bounded:
            caps = [c for c in (tenant_limits.tokens_per_minute, key_limits.tokens_per_minute) if c]
            if caps:
                max_completion = max(0, min(max_completion, min(caps) - prompt_tokens))
        try:
            adm = self.quota.admit(p.tenant_id, p.key_id, tenant_limits, key_limits, prompt_tokens, max_completion)
        except QuotaExceeded as e:
            headers = {"Retry-After": retry_after_header(e.retry_after)}
            if e.hard:
                headers["x-should-retry"] = "false"
            raise APIError(429, e.message, "rate_limit_error", code="quota_exceeded" if e.hard else "rate_limited",
                           headers=headers) from None
        self._inflight[p.tenant_id] = self._inflight.get(p.tenant_id, 0) + adm.reserved
        return adm

    def release(self, adm: Admission, actual_tokens: int) -> None:
        self._inflight[adm.tenant] = self._inflight.get(adm.tenant, 0) - adm.reserved
        self.quota.reconcile(adm, actual_tokens)

    # -- cache salt -----------------------------------------------------------------------------

    def cache_salt(self, p: Principal, client_salt: str | None) -> str:
        parts = [] if self.share_prefix_cache else [f"tenant:{p.tenant_id}"]
        if client_salt:
            parts.append(f"client:{client_salt}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32] if parts else ""
