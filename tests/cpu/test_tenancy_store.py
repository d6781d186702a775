"""The tenant plane's storage layer, on SQLite and on a real PostgreSQL server:
the usage ledger (idempotent metering, durable, rated apart from metering),
tenants and API keys (hashed, never stored in clear), admission control with
a fake clock, and request logs with per-tenant retention."""

from __future__ import annotations

import calendar
import contextlib
import csv
import io
import random
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from ziggurat.actors.meter.ledger import Ledger, Price, month_start, to_csv
from ziggurat.actors.meter.messages import UsageEvent
from ziggurat.actors.meter.quota import Limits, QuotaExceeded, QuotaTracker
from ziggurat.actors.meter.store import Store
from ziggurat.actors.meter.tenancy import TenantPlane
from ziggurat.actors.meter.tenants import KEY_PREFIX, Principal, TenantError, TenantStore, key_id_of, verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pg import PgServer, PgUnavailable, find_bin_dir  # noqa: E402

T0 = float(calendar.timegm((2023, 11, 14, 12, 0, 0)))  # a fixed noon, UTC
DAY = 86400.0


# -- backends ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server():
    try:
        find_bin_dir()
    except PgUnavailable as e:
        pytest.skip(f"PostgreSQL cannot be installed/found: {e}")
    srv = PgServer.start()  # binaries present but the server won't start: an error, not a skip
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    """A fresh, empty database per test."""
    if request.param == "sqlite":
        return str(tmp_path / "tenancy.db")
    return request.getfixturevalue("pg_server").new_db()


@pytest.fixture
def opened():
    """opened(store_or_plane) -> it; closed at teardown (closing twice is harmless)."""
    things = []

    def track(x):
        things.append(x)
        return x

    yield track
    for x in things:
        with contextlib.suppress(Exception):
            (x.store if isinstance(x, TenantPlane) else x).close()


def ev(rid: str, tenant: str = "t1", key: str | None = "k1", model: str = "m1", p: int = 100, c: int = 0,
       o: int = 10, status: str = "stop", fin: float = T0) -> UsageEvent:
    return UsageEvent(request_id=rid, http_request_id=f"http-{rid}", tenant=tenant, key_id=key, model=model,
                      lora=None, replica=0, gpu_type="cpu", prompt_tokens=p, cached_tokens=c, completion_tokens=o,
                      status=status, arrived_at=fin - 1.5, finished_at=fin, ttft_ms=12.5, duration_ms=1500.0)


def count(store: Store, table: str = "usage_events") -> int:
    return store.query(f"SELECT COUNT(*) FROM {table}")[0][0]


def all_cells(store: Store) -> list[tuple[str, object]]:
    """(table, value) for every column of every row of every table."""
    if store.kind == "sqlite":
        tables = [r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    else:
        tables = [r[0] for r in store.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
    assert {"usage_events", "tenants", "api_keys", "prices", "request_logs"} <= set(tables)
    return [(t, v) for t in tables for row in store.query(f"SELECT * FROM {t}") for v in row]


# -- 1. metering is idempotent ----------------------------------------------------------------------


def test_ledger_record_is_idempotent(url, opened):
    store = opened(Store.open(url))
    led = Ledger(store)
    rng = random.Random(1234)
    evs = []
    for i in range(120):
        p = rng.randint(1, 4000)
        evs.append(ev(f"req-{i:04d}", tenant=f"t{i % 3}", key=f"k{i % 5}", model=f"m{i % 2}", p=p,
                      c=rng.randint(0, p), o=rng.randint(0, 800), status=rng.choice(["stop", "length", "aborted"]),
                      fin=T0 + i * 600))
    first, rest = evs[:80], evs[80:]

    assert led.record([]) == 0
    assert led.record(first) == 80
    led.set_price(Price("m0", 1.0, 0.5, 2.0))
    snapshot = (count(store), led.totals(), led.usage(by="model"), led.events())
    assert snapshot[0] == 80

    # Replays: everything twice, reversed, shuffled, in small batches -> nothing new.
    assert led.record(first + first) == 0
    assert led.record(first[::-1]) == 0
    shuffled = first[:]
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), 7):
        assert led.record(shuffled[i:i + 7]) == 0
    assert (count(store), led.totals(), led.usage(by="model"), led.events()) == snapshot

    # Batches that mix old and new events (and repeat new ones inside the batch): only the new count.
    assert led.record(first[:15] + rest[:10] + rest[:10] + first[40:45]) == 10
    remaining = rest[10:]
    added = 0
    for i in range(0, len(remaining), 6):
        batch = remaining[i:i + 6] + rng.sample(first, 4) + rest[:3]
        rng.shuffle(batch)
        added += led.record(batch)
    assert added == len(rest) - 10
    assert led.record(evs + evs[::-1]) == 0
    assert count(store) == len(evs)

    expected: dict[str, dict] = {}
    for e in evs:
        t = expected.setdefault(e.tenant, {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0,
                                           "completion_tokens": 0})
        t["requests"] += 1
        t["prompt_tokens"] += e.prompt_tokens
        t["cached_tokens"] += e.cached_tokens
        t["completion_tokens"] += e.completion_tokens
    assert led.totals() == expected
    assert led.totals("t1") == {"t1": expected["t1"]}
    assert sorted(led.events(), key=lambda e: e.request_id) == evs  # every field round-trips


def test_ledger_rejects_unknown_status(url, opened):
    store = opened(Store.open(url))
    led = Ledger(store)
    assert led.record([ev("ok-1")]) == 1
    with pytest.raises(ValueError, match=r"bad-7.*'finished'"):
        led.record([ev("ok-2"), ev("bad-7", status="finished")])
    assert [e.request_id for e in led.events()] == ["ok-1"]  # the whole batch was refused
    assert led.record([ev("ok-2")]) == 1


# -- 2. durability across reopen -------------------------------------------------------------------


def test_events_and_keys_survive_reopen(url, opened):
    plane = opened(TenantPlane(url))
    evs = [ev(f"d-{i}", fin=T0 + i) for i in range(25)]
    assert plane.record(evs) == 25
    plane.tenants.create_tenant("acme", tokens_per_minute=5000)
    key, rec = plane.tenants.create_key("acme", models=["tiny"])
    plane.set_price("m1", 1.0, 0.1, 2.0)
    plane.store.close()

    again = opened(TenantPlane(url))
    assert again.ledger.events() == evs
    assert again.record(evs) == 0  # still idempotent after reopen
    assert again.tenants.get_tenant("acme").tokens_per_minute == 5000
    principal, why = again.authenticate(key)
    assert why is None and principal.key_id == rec.key_id and principal.models == ("tiny",)
    assert again.ledger.prices() == {"m1": Price("m1", 1.0, 0.1, 2.0)}
    if again.store.kind == "sqlite":
        assert again.store.query("PRAGMA journal_mode") == [("wal",)]
        again.store.close()
        raw = sqlite3.connect(url)  # WAL is a property of the file, not of our connection
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert raw.execute("SELECT COUNT(*) FROM usage_events").fetchone() == (25,)
        finally:
            raw.close()


# -- 3. rating is separate from metering ------------------------------------------------------------


def _cost(e: UsageEvent, p: Price) -> float:
    return ((e.prompt_tokens - e.cached_tokens) * p.input_per_mtok + e.cached_tokens * p.cached_input_per_mtok
            + e.completion_tokens * p.output_per_mtok) / 1e6


def test_rating_prices_grouping_and_csv(url, opened):
    store = opened(Store.open(url))
    led = Ledger(store)
    e1 = ev("e1", tenant="t1", key="k1", model="m1", p=1000, c=400, o=200, fin=T0)
    e2 = ev("e2", tenant="t1", key="k2", model="m1", p=2000, c=0, o=500, fin=T0 + DAY)
    e3 = ev("e3", tenant="t1", key="k1", model="m2", p=300, c=100, o=50, fin=T0 + 60)
    e4 = ev("e4", tenant="t2", key="k3", model="m1", p=10, c=10, o=1, fin=T0)
    e5 = ev("e5", tenant="t1", key=None, model="m1", p=70, c=0, o=7, fin=T0 + 120)  # open mode: no key
    assert led.record([e1, e2, e3, e4, e5]) == 5
    m1 = Price("m1", 3.0, 0.3, 15.0)
    led.set_price(m1)
    assert led.prices() == {"m1": m1}
    approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-15)  # noqa: E731

    rows = led.usage()
    assert [(r["tenant"], r["all"]) for r in rows] == [("t1", ""), ("t2", "")]
    t1, t2 = rows
    assert t1["cost"] == approx(_cost(e1, m1) + _cost(e2, m1) + _cost(e5, m1))
    assert t1["cost"] == approx((600 * 3.0 + 400 * 0.3 + 200 * 15.0 + 2000 * 3.0 + 500 * 15.0
                                 + 70 * 3.0 + 7 * 15.0) / 1e6)
    assert t1["unpriced_tokens"] == 350 and t1["requests"] == 4
    assert (t1["prompt_tokens"], t1["cached_tokens"], t1["completion_tokens"]) == (3370, 500, 757)
    assert t2["cost"] == approx(_cost(e4, m1)) and t2["unpriced_tokens"] == 0

    by_model = {(r["tenant"], r["model"]): r for r in led.usage(by="model")}
    assert set(by_model) == {("t1", "m1"), ("t1", "m2"), ("t2", "m1")}
    assert by_model["t1", "m2"]["cost"] == 0.0 and by_model["t1", "m2"]["unpriced_tokens"] == 350
    assert by_model["t1", "m1"]["requests"] == 3 and by_model["t1", "m1"]["unpriced_tokens"] == 0

    by_key = led.usage(by="key")  # mixes a None key with named keys in one tenant
    assert [(r["tenant"], r["key"]) for r in by_key] == [("t1", None), ("t1", "k1"), ("t1", "k2"), ("t2", "k3")]
    k1 = by_key[1]
    assert k1["requests"] == 2 and k1["cost"] == approx(_cost(e1, m1)) and k1["unpriced_tokens"] == 350

    by_day = {(r["tenant"], r["day"]): r["requests"] for r in led.usage(by="day")}
    assert by_day == {("t1", "2023-11-14"): 3, ("t1", "2023-11-15"): 1, ("t2", "2023-11-14"): 1}
    assert [r["requests"] for r in led.usage("t1", since=T0 + DAY / 2)] == [1]  # only e2
    assert [r["requests"] for r in led.usage("t1", until=T0 + DAY / 2)] == [3]
    with pytest.raises(ValueError, match="by"):
        led.usage(by="tenant")
    spend, tokens = led.spend_and_tokens("t1", 0.0)
    assert spend == approx(t1["cost"]) and tokens == 3370 + 757

    # A price change re-rates history; the events themselves are untouched.
    events_before = led.events()
    m1b = Price("m1", 6.0, 0.3, 15.0)
    led.set_price(m1b)
    led.set_price(Price("m2", 1.0, 1.0, 1.0))
    assert led.events() == events_before
    t1b = led.usage("t1")[0]
    assert t1b["cost"] == approx(_cost(e1, m1b) + _cost(e2, m1b) + _cost(e5, m1b) + (300 + 50) / 1e6)
    assert t1b["cost"] - t1["cost"] == approx((600 + 2000 + 70) * 3.0 / 1e6 + 350 / 1e6)
    assert t1b["unpriced_tokens"] == 0

    # CSV: a header and one row per group.
    rows = led.usage(by="model")
    text = to_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0].split(",") == list(rows[0])
    assert len(parsed) == len(rows) == 3 and len(text.splitlines()) == 4
    assert [(r["tenant"], r["model"], int(r["requests"])) for r in parsed] == [("t1", "m1", 3), ("t1", "m2", 1),
                                                                              ("t2", "m1", 1)]
    assert float(parsed[0]["cost"]) == approx(rows[0]["cost"])
    assert to_csv([]) == ""


# -- 4. tenants and keys ------------------------------------------------------------------------------


def test_tenants_limits_and_validation(url, opened):
    ts = TenantStore(opened(Store.open(url)))
    acme = ts.create_tenant("acme", requests_per_minute=60, tokens_per_minute=10000, monthly_token_cap=10**9)
    assert ts.get_tenant("acme") == acme == ts.get_tenant(acme.tenant_id)
    with pytest.raises(TenantError, match=r"^name: .*'acme'"):
        ts.create_tenant("acme")
    with pytest.raises(TenantError, match=r"^name:"):
        ts.create_tenant("")
    other = ts.create_tenant("globex")
    assert other.tenant_id != acme.tenant_id and [t.name for t in ts.tenants()] == ["acme", "globex"]

    upd = ts.update_tenant("acme", tokens_per_minute=20000, log_requests=True, log_retention_days=7)
    assert ts.get_tenant("acme") == upd
    assert (upd.requests_per_minute, upd.tokens_per_minute, upd.monthly_token_cap) == (60, 20000, 10**9)
    assert upd.log_requests is True and upd.log_retention_days == 7
    assert ts.get_tenant("globex").tokens_per_minute is None  # other tenants untouched

    for bad, field in (({"tokens_per_minute": -1}, "tokens_per_minute"),
                       ({"requests_per_minute": "10"}, "requests_per_minute"),
                       ({"monthly_token_cap": True}, "monthly_token_cap"),
                       ({"rpm": 5}, "rpm")):
        with pytest.raises(TenantError, match=f"^{field}:"):
            ts.update_tenant("acme", **bad)
        with pytest.raises(TenantError, match=f"^{field}:"):
            ts.create_tenant("new-one", **bad)
    assert ts.get_tenant("acme") == upd and ts.find_tenant("new-one") is None
    with pytest.raises(TenantError, match=r"^tenant:"):
        ts.update_tenant("nobody", tokens_per_minute=1)


def test_keys_hashed_verified_and_authenticated(url, opened):
    plane = opened(TenantPlane(url))
    ts = plane.tenants
    acme = ts.create_tenant("acme")
    assert not plane.has_keys()
    key, rec = ts.create_key("acme", models=["tiny", "big"], requests_per_minute=30, tokens_per_minute=9000)
    assert plane.has_keys()
    assert key.startswith(f"{KEY_PREFIX}{rec.key_id}-") and key_id_of(key) == rec.key_id
    secret = key[len(f"{KEY_PREFIX}{rec.key_id}-"):]
    assert len(secret) >= 40
    assert verify(key, rec) is None and verify(key, ts.get_key(rec.key_id)) is None
    assert ts.get_key(rec.key_id) == rec

    # Neither the key nor any piece of its secret is in the record, its public view, or anywhere in the DB.
    pieces = {secret[i:i + 6] for i in range(len(secret) - 5)}
    texts = [str(v) for v in vars(rec).values()] + [str(rec.public())]
    assert not any(key in t or any(p in t for p in pieces) for t in texts)
    assert "key_hash" not in rec.public() and "salt" not in rec.public()
    cells = all_cells(plane.store)
    assert any(v == rec.key_hash for _, v in cells)  # the scan does see the api_keys row
    leaks = [(t, v) for t, v in cells if isinstance(v, (str, bytes)) and (
        key in str(v) or secret in str(v) or any(p in str(v) for p in pieces))]
    assert leaks == []

    # Wrong, unknown, revoked and expired keys: verify says why.
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert verify(wrong, rec) == "unknown key"
    assert verify(key, None) == "unknown key"
    assert plane.authenticate(wrong) == (None, "unknown key")
    assert plane.authenticate(f"{KEY_PREFIX}000000000000-{secret}") == (None, "unknown key")
    assert plane.authenticate("sk-not-ours") == (None, "unknown key")
    assert plane.authenticate("") == (None, "unknown key")

    principal, why = plane.authenticate(key)
    assert why is None
    assert principal == Principal(acme.tenant_id, rec.key_id, ("tiny", "big"), 30, 9000)

    short, srec = ts.create_key("acme", expires_in_s=3600)
    assert srec.expires_at == pytest.approx(srec.created_at + 3600)
    assert verify(short, srec, now=srec.created_at + 3599) is None
    assert verify(short, srec, now=srec.created_at + 3601) == "key expired"
    assert verify(short, ts.get_key(srec.key_id), now=srec.created_at + 3600) == "key expired"
    assert plane.authenticate(short)[1] is None  # not yet expired now

    assert ts.revoke_key(rec.key_id) is True
    assert ts.revoke_key(rec.key_id) is False  # already revoked
    assert ts.revoke_key("no-such-key") is False
    assert ts.get_key(rec.key_id).revoked_at is not None
    assert verify(key, ts.get_key(rec.key_id)) == "key revoked"
    assert plane.authenticate(key) == (None, "key revoked")
    assert plane.authenticate(short)[1] is None  # revoking one key leaves the others

    ts.create_tenant("globex")
    ids = [rec.key_id, srec.key_id] + [ts.create_key("globex" if i % 2 else "acme")[1].key_id for i in range(30)]
    assert len(set(ids)) == len(ids)
    assert {k.key_id for k in ts.keys("acme")} | {k.key_id for k in ts.keys("globex")} == set(ids)
    assert len(ts.keys()) == len(ids)
    with pytest.raises(TenantError, match=r"^tenant:"):
        ts.create_key("nobody")


# -- 5. admission control -------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


NONE = Limits()


def test_quota_tokens_per_minute_window_and_isolation():
    clock = Clock(T0)
    q = QuotaTracker(clock)
    lim = Limits(tokens_per_minute=1000)
    q.admit("a", None, lim, NONE, 500, 100)  # reserves 600
    clock.t += 10
    with pytest.raises(QuotaExceeded) as ei:
        q.admit("a", None, lim, NONE, 300, 200)  # 600 + 500 > 1000
    assert ei.value.hard is False and ei.value.retry_after == pytest.approx(50.0)
    assert "tokens per minute" in ei.value.message
    q.admit("b", None, lim, NONE, 300, 200)  # another tenant is unaffected
    q.admit("a", None, lim, NONE, 300, 100)  # 600 + 400 == 1000 still fits
    with pytest.raises(QuotaExceeded):
        q.admit("a", None, lim, NONE, 1, 0)
    clock.t += 61
    q.admit("a", None, lim, NONE, 300, 200)  # the window has passed

    # One request larger than the limit can never fit: hard.
    with pytest.raises(QuotaExceeded) as ei:
        q.admit("c", None, lim, NONE, 900, 101)
    assert ei.value.hard is True and "1001" in ei.value.message


def test_quota_requests_per_minute_tenant_and_key():
    clock = Clock(T0)
    q = QuotaTracker(clock)
    tenant_lim, key_lim = Limits(requests_per_minute=5), Limits(requests_per_minute=2)
    q.admit("a", "k1", tenant_lim, key_lim, 1, 1)
    clock.t += 1
    q.admit("a", "k1", tenant_lim, key_lim, 1, 1)
    clock.t += 1
    with pytest.raises(QuotaExceeded) as ei:
        q.admit("a", "k1", tenant_lim, key_lim, 1, 1)
    assert ei.value.hard is False and "API key" in ei.value.message
    assert ei.value.retry_after == pytest.approx(58.0)  # the first request leaves the window at T0 + 60
    q.admit("a", "k2", tenant_lim, key_lim, 1, 1)  # the other key of the same tenant still may
    q.admit("a", "k2", tenant_lim, key_lim, 1, 1)
    q.admit("a", "k3", tenant_lim, NONE, 1, 1)  # 5th request of the tenant
    with pytest.raises(QuotaExceeded) as ei:
        q.admit("a", "k4", tenant_lim, NONE, 1, 1)  # a fresh key, but the tenant is at 5/min
    assert ei.value.hard is False and "tenant rate limit of 5 requests" in ei.value.message
    q.admit("b", "k9", tenant_lim, key_lim, 1, 1)  # other tenants unaffected
    clock.t = T0 + 61
    q.admit("a", "k1", tenant_lim, key_lim, 1, 1)

    # Per-key tokens/min, with the tenant unlimited.
    kq = QuotaTracker(Clock(T0))
    kq.admit("a", "k1", NONE, Limits(tokens_per_minute=100), 60, 20)
    with pytest.raises(QuotaExceeded) as ei:
        kq.admit("a", "k1", NONE, Limits(tokens_per_minute=100), 30, 0)
    assert ei.value.hard is False and ei.value.retry_after > 0
    kq.admit("a", "k2", NONE, Limits(tokens_per_minute=100), 30, 0)
    with pytest.raises(QuotaExceeded) as ei:
        kq.admit("a", "k2", NONE, Limits(tokens_per_minute=100), 80, 21)
    assert ei.value.hard is True


def test_quota_reconcile_frees_unused_reservation():
    clock = Clock(T0)
    q = QuotaTracker(clock)
    lim = Limits(tokens_per_minute=1000)
    adm = q.admit("a", "k1", lim, lim, 200, 600)  # reserves 800 on tenant and key
    clock.t += 3
    with pytest.raises(QuotaExceeded):
        q.admit("a", "k1", lim, lim, 300, 100)
    q.reconcile(adm, 250)  # it used 250, not 800
    q.admit("a", "k1", lim, lim, 300, 100)  # 250 + 400 <= 1000
    assert q.tokens["t:a"].total(clock.t) == 650 and q.tokens["k:k1"].total(clock.t) == 650
    assert q.month["a"].admitted_tokens == 650
    with pytest.raises(QuotaExceeded):
        q.admit("a", "k1", lim, lim, 300, 100)


def test_quota_monthly_token_cap_is_hard_until_month_end():
    now = float(calendar.timegm((2024, 2, 10, 0, 0, 0)))
    clock = Clock(now)
    q = QuotaTracker(clock)
    lim = Limits(monthly_token_cap=1000)
    q.refresh_month("a", ledger_tokens=700, ledger_spend=0.0)
    q.admit("a", None, lim, NONE, 100, 100)  # 900 of 1000
    with pytest.raises(QuotaExceeded) as ei:
        q.admit("a", None, lim, NONE, 100, 1)
    assert ei.value.hard is True
    assert ei.value.retry_after == pytest.approx(20 * DAY)  # to 2024-03-01 00:00 UTC (a leap year)
    assert "monthly token cap of 1000" in ei.value.message
    clock.t = float(calendar.timegm((2024, 12, 31, 23, 0, 0)))
    with pytest.raises(QuotaExceeded) as ei:
        q.admit("a", None, lim, NONE, 100, 1)
    assert ei.value.retry_after == pytest.approx(3600.0)  # across the year boundary
    q.admit("b", None, lim, NONE, 100, 1)  # another tenant

    spend = QuotaTracker(Clock(now))
    spend.refresh_month("a", 0, ledger_spend=9.5)
    with pytest.raises(QuotaExceeded) as ei:
        spend.admit("a", None, Limits(monthly_spend_cap=10.0), NONE, 1, 1, est_cost=0.6)
    assert ei.value.hard is True and ei.value.retry_after == pytest.approx(20 * DAY)


def test_quota_refresh_month_uses_ledger_totals(url, opened):
    plane = opened(TenantPlane(url))
    a = plane.tenants.create_tenant("a", monthly_token_cap=1000)
    plane.set_price("m1", 2.0, 1.0, 4.0)
    q = QuotaTracker()  # real clock: month_usage() looks at the current month
    lim = Limits(monthly_token_cap=a.monthly_token_cap)
    adms = [q.admit(a.tenant_id, None, lim, NONE, 100, 200) for _ in range(3)]  # reserves 900
    with pytest.raises(QuotaExceeded) as ei:
        q.admit(a.tenant_id, None, lim, NONE, 100, 100)
    assert ei.value.hard
    # What the requests really used reaches the ledger (this month), plus an old event that must not count.
    now = time.time()
    evs = [ev(f"m{i}", tenant=a.tenant_id, p=100, c=20, o=30, fin=now - i) for i in range(len(adms))]
    plane.record(evs + [ev("old", tenant=a.tenant_id, p=10**6, fin=month_start() - 10)])
    usage = plane.month_usage([a.tenant_id, "nobody"])
    tokens, spend = usage[a.tenant_id]
    assert tokens == 3 * 130
    assert spend == pytest.approx(3 * (80 * 2.0 + 20 * 1.0 + 30 * 4.0) / 1e6)
    assert usage["nobody"] == (0, 0)
    q.refresh_month(a.tenant_id, tokens, spend)
    assert (q.month[a.tenant_id].tokens, q.month[a.tenant_id].admitted_tokens) == (390, 0)
    q.admit(a.tenant_id, None, lim, NONE, 300, 300)  # 390 + 600 <= 1000
    with pytest.raises(QuotaExceeded):
        q.admit(a.tenant_id, None, lim, NONE, 5, 6)


# -- 6. request logs ---------------------------------------------------------------------------------


def test_request_logs_are_per_tenant_and_purged_by_retention(url, opened):
    plane = opened(TenantPlane(url))
    a = plane.tenants.create_tenant("a", log_requests=True, log_retention_days=1)
    b = plane.tenants.create_tenant("b", log_requests=True, log_retention_days=30)
    for i in range(3):
        plane.log_request(f"a-{i}", a.tenant_id, {"prompt": f"hello {i}"}, {"text": f"world {i}"})
    plane.log_request("b-0", b.tenant_id, {"prompt": "secret of b"}, {"text": "ok", "n": [1, 2]})
    plane.log_request("a-0", a.tenant_id, {"prompt": "replayed"}, {"text": "dup"})  # first write wins

    logs_a = plane.logs("a")
    assert sorted(r["request_id"] for r in logs_a) == ["a-0", "a-1", "a-2"]
    assert plane.logs(a.tenant_id) == logs_a  # by id or by name
    one = plane.logs("a", request_id="a-1")
    assert [(r["request"], r["response"]) for r in one] == [({"prompt": "hello 1"}, {"text": "world 1"})]
    assert plane.logs("a", request_id="a-0")[0]["request"] == {"prompt": "hello 0"}
    assert len(plane.logs("a", limit=2)) == 2
    assert plane.logs("b", request_id="b-0")[0]["response"] == {"text": "ok", "n": [1, 2]}
    # Another tenant can't read them, even knowing the request id.
    assert plane.logs("b", request_id="a-1") == []
    assert plane.logs("a", request_id="b-0") == []
    assert [r["request_id"] for r in plane.logs("b")] == ["b-0"]
    with pytest.raises(TenantError):
        plane.logs("nobody")

    now = time.time()
    assert plane.purge_logs(now=now) == 0
    assert plane.purge_logs(now=now + 2 * DAY) == 3  # a keeps 1 day, b 30
    assert plane.logs("a") == [] and [r["request_id"] for r in plane.logs("b")] == ["b-0"]
    assert plane.purge_logs(now=now + 29 * DAY) == 0
    assert plane.purge_logs(now=now + 31 * DAY) == 1
    assert count(plane.store, "request_logs") == 0


# -- regressions ---------------------------------------------------------------------------------------


def test_store_usable_after_a_failed_query(url, opened):
    """A query the server rejects must not poison the connection for every later call."""
    plane = opened(TenantPlane(url))
    plane.tenants.create_tenant("acme")
    key, _ = plane.tenants.create_key("acme")
    with contextlib.suppress(Exception):
        plane.tenants.find_tenant(123)  # e.g. {"tenant": 123} sent to POST /admin/keys
    assert plane.authenticate(key)[1] is None


def test_create_key_validates_its_arguments(tmp_path, opened):
    ts = TenantStore(opened(Store.open(tmp_path / "t.db")))
    ts.create_tenant("acme")
    with pytest.raises(TenantError, match="^models:"):
        ts.create_key("acme", models="tiny")
    with pytest.raises(TenantError, match="^requests_per_minute:"):
        ts.create_key("acme", requests_per_minute="abc")


def test_an_ingress_record_supersedes_the_schedulers_event(url, opened):
    """SQLite and PostgreSQL alike: a "replica_failed" record (what the client
    received, from the ingress) replaces the scheduler's event for the same
    request, in either order: an "error", or a normal ending the scheduler
    reached while the ingress that would have streamed it was dead."""
    ledger = Ledger(opened(Store.open(url)))
    ledger.record([ev("a", status="error", o=40), ev("c", status="length", o=32)])
    assert ledger.record([ev("a", status="replica_failed", o=12), ev("b", status="replica_failed", o=5),
                          ev("c", status="replica_failed", o=9)]) == 3
    assert ledger.record([ev("b", status="error", o=30), ev("d", status="stop", o=4)]) == 1
    got = {e.request_id: (e.status, e.completion_tokens) for e in ledger.events()}
    assert got == {"a": ("replica_failed", 12), "b": ("replica_failed", 5), "c": ("replica_failed", 9),
                   "d": ("stop", 4)}
