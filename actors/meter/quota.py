"""Admission control: requests/min and tokens/min windows, monthly caps.

Counters are approximate and local to one ingress, checked without any
round trip on the hot path. Tokens/min reserves prompt + max completion at
admission and is reconciled to the actual count when the request ends.
Monthly caps use month-to-date totals refreshed from the ledger (the billing
truth) plus what this ingress admitted since the last refresh.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


class WindowCounter:
    """A sliding window of `window_s` seconds in 1-second buckets."""

    def __init__(self, window_s: int = 60):
        self.window = window_s
        self.buckets: dict[int, float] = {}

    def _trim(self, now: float) -> None:
        oldest = int(now) - self.window + 1
        for b in [b for b in self.buckets if b < oldest]:
            del self.buckets[b]

    def total(self, now: float) -> float:
        self._trim(now)
        return sum(self.buckets.values())

    def add(self, now: float, amount: float, at: int | None = None) -> int:
        """Adds to the bucket of `now` (or bucket `at` if still in the window); returns the bucket."""
        b = int(now) if at is None else at
        if b >= int(now) - self.window + 1:
            self.buckets[b] = self.buckets.get(b, 0.0) + amount
        return b

    def retry_after(self, now: float, limit: float, need: float) -> float:
        """Seconds until total + need <= limit, as old buckets expire."""
        self._trim(now)
        total = sum(self.buckets.values())
        for b in sorted(self.buckets):
            if total + need <= limit:
                break
            total -= self.buckets[b]
            wait = b + self.window - now
            if total + need <= limit:
                return max(wait, 0.0)
        return 0.0 if total + need <= limit else float(self.window)


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after: float, hard: bool):
        super().__init__(message)
        self.message, self.retry_after, self.hard = message, retry_after, hard


@dataclass
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_token_cap: int | None = None
    monthly_spend_cap: float | None = None


@dataclass
class Admission:
    scopes: list[str]
    bucket: int
    reserved: int
    tenant: str
    spend_reserved: float = 0.0


@dataclass
class _Month:
    tokens: float = 0.0  # from the ledger at the last refresh
    spend: float = 0.0
    admitted_tokens: float = 0.0  # admitted here since the refresh (reserved, then actual)
    admitted_spend: float = 0.0


class QuotaTracker:
    def __init__(self, clock=time.time):
        self.clock = clock
        self.requests: dict[str, WindowCounter] = {}
        self.tokens: dict[str, WindowCounter] = {}
        self.month: dict[str, _Month] = {}

    def admit(self, tenant: str, key_id: str | None, tenant_limits: Limits, key_limits: Limits,
              prompt_tokens: int, max_completion: int, est_cost: float = 0.0) -> Admission:
        now = self.clock()
        scopes = [(f"t:{tenant}", tenant_limits, "tenant")]
        if key_id is not None:
            scopes.append((f"k:{key_id}", key_limits, "API key"))
        need = prompt_tokens + max_completion
        m = self.month.setdefault(tenant, _Month())
        if tenant_limits.monthly_token_cap is not None:
            used = m.tokens + m.admitted_tokens
            if used + need > tenant_limits.monthly_token_cap:
                raise QuotaExceeded(f"monthly token cap of {tenant_limits.monthly_token_cap} reached "
                                    f"({int(used)} used, this request may need {need})", _to_month_end(now), True)
        if tenant_limits.monthly_spend_cap is not None and m.spend + m.admitted_spend + est_cost > tenant_limits.monthly_spend_cap:
            raise QuotaExceeded(f"monthly spend cap of {tenant_limits.monthly_spend_cap} reached", _to_month_end(now), True)
        for scope, lim, what in scopes:
            if lim.requests_per_minute is not None:
                c = self.requests.setdefault(scope, WindowCounter())
                if c.total(now) + 1 > lim.requests_per_minute:
                    raise QuotaExceeded(f"{what} rate limit of {lim.requests_per_minute} requests per minute reached",
                                        c.retry_after(now, lim.requests_per_minute, 1), False)
            if lim.tokens_per_minute is not None:
                if need > lim.tokens_per_minute:
                    raise QuotaExceeded(f"this request may need {need} tokens, over the {what} limit of "
                                        f"{lim.tokens_per_minute} tokens per minute", 0.0, True)
                c = self.tokens.setdefault(scope, WindowCounter())
                if c.total(now) + need > lim.tokens_per_minute:
                    raise QuotaExceeded(f"{what} rate limit of {lim.tokens_per_minute} tokens per minute reached",
                                        c.retry_after(now, lim.tokens_per_minute, need), False)
        bucket = int(now)
        for scope, _, _ in scopes:
            self.requests.setdefault(scope, WindowCounter()).add(now, 1)
            self.tokens.setdefault(scope, WindowCounter()).add(now, need)
        m.admitted_tokens += need
        m.admitted_spend += est_cost
        return Admission([s for s, _, _ in scopes], bucket, need, tenant, est_cost)

    def reconcile(self, adm: Admission, actual_tokens: int, actual_cost: float = 0.0) -> None:
        """Replace the reservation by what the request really used."""
        now = self.clock()
        delta = actual_tokens - adm.reserved
        for scope in adm.scopes:
            self.tokens[scope].add(now, delta, at=adm.bucket)
        m = self.month.setdefault(adm.tenant, _Month())
        m.admitted_tokens += delta
        m.admitted_spend += actual_cost - adm.spend_reserved

    def refresh_month(self, tenant: str, ledger_tokens: float, ledger_spend: float,
                      inflight_tokens: float = 0.0) -> None:
        """Correct from the ledger: its month-to-date totals replace our estimate;
        only requests still in flight here stay counted on top."""
        m = self.month.setdefault(tenant, _Month())
        m.tokens, m.spend = ledger_tokens, ledger_spend
        m.admitted_tokens, m.admitted_spend = inflight_tokens, 0.0


def _to_month_end(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return max(0.0, time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone - now)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
