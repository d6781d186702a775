"""The tenant plane end to end: keys, quotas, prefix-cache isolation, request
logs and exactly-once metering under faults, over HTTP with real actors."""

from __future__ import annotations

import asyncio
import glob
import random
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")

from conftest import free_port  # noqa: E402
from ziggurat.cluster.deploy import Deployment, DeploymentSpec  # noqa: E402

ADMIN = "admin-secret-key-0001"






@pytest.fixture(scope="module")
def dep(ray_cluster, llama_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("ledger") / "tenancy.db"
    d = Deployment(DeploymentSpec.from_flat(model=str(llama_dir), served_model_name="tiny", port=free_port(), replicas=2,
                                  num_kv_blocks=512, max_num_batched_tokens=256, device="cpu", db=str(db),
                                  admin_key=ADMIN, redact="ziggurat.actors.meter.tenancy:redact_pii"))
    yield d
    d.shutdown()


def admin(dep, method, path, **kw):
    r = httpx.request(method, dep.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw)
    assert r.status_code < 300, r.text
    return r.json() if "json" in r.headers.get("content-type", "") else r.text


@pytest.fixture(scope="module")
def tenants(dep):
    out = {}
    for name, limits in (("acme", {"log_requests": True}), ("globex", {}), ("initech", {}),
                         ("small", {"tokens_per_minute": 250})):
        admin(dep, "POST", "/admin/tenants", json={"name": name, **limits})
        out[name] = admin(dep, "POST", "/admin/keys", json={"tenant": name})["key"]
    time.sleep(5.5)  # the ingress learns within its cache TTL that keys now exist
    return out


def client(dep, key):
    return openai.OpenAI(base_url=dep.base_url, api_key=key, max_retries=0)


def test_keys_required_once_tenants_have_keys(dep, tenants):
    with pytest.raises(openai.AuthenticationError):
        client(dep, "none").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(dep, tenants["acme"][:-2] + "xx").models.list()
    assert client(dep, tenants["acme"]).models.list().data[0].id == "tiny"
    # Revocation through the admin API.
    extra = admin(dep, "POST", "/admin/keys", json={"tenant": "globex", "models": ["other-model"]})
    with pytest.raises(openai.PermissionDeniedError):
        client(dep, extra["key"]).completions.create(model="tiny", prompt="x", max_tokens=2)
    admin(dep, "DELETE", f"/admin/keys/{extra['key_id']}")
    keys = admin(dep, "GET", "/admin/keys?tenant=globex")["data"]
    assert [k["revoked_at"] is not None for k in keys if k["key_id"] == extra["key_id"]] == [True]


def test_prefix_cache_is_isolated_per_tenant(dep, tenants):
    prompt = "A long shared system prompt about the policies of the company. " * 6
    a, b = client(dep, tenants["acme"]), client(dep, tenants["globex"])
    cached = lambda c: c.completions.create(model="tiny", prompt=prompt, max_tokens=2).usage.prompt_tokens_details.cached_tokens  # noqa: E731
    assert cached(a) == 0
    assert cached(b) == 0  # acme's blocks are invisible to globex
    assert cached(a) > 0
    assert cached(b) > 0


def test_tokens_per_minute_limit(dep, tenants):
    small, other = client(dep, tenants["small"]), client(dep, tenants["globex"])
    prompt = "one two three four five six seven eight nine ten " * 3
    eos = {"ignore_eos": True}  # every request uses exactly what it reserved
    n = small.completions.create(model="tiny", prompt=prompt, max_tokens=100, extra_body=eos).usage.prompt_tokens
    assert n + 100 <= 250 < 2 * (n + 100)
    with pytest.raises(openai.RateLimitError) as e:
        small.completions.create(model="tiny", prompt=prompt, max_tokens=100, extra_body=eos)
    h = e.value.response.headers
    assert int(h["retry-after"]) >= 1 and "x-should-retry" not in h
    assert e.value.body["code"] == "rate_limited"
    # Other tenants are unaffected.
    assert other.completions.create(model="tiny", prompt=prompt, max_tokens=100).usage.completion_tokens > 0
    # A request that can never fit is a hard refusal.
    with pytest.raises(openai.RateLimitError) as e:
        small.completions.create(model="tiny", prompt=prompt, max_tokens=500)
    assert e.value.response.headers["x-should-retry"] == "false"


def test_request_logs_only_where_enabled(dep, tenants):
    r = client(dep, tenants["acme"]).completions.with_raw_response.create(
        model="tiny", prompt="log me, mail jane.doe@example.com", max_tokens=3)
    rid = r.headers["x-request-id"]
    text = r.parse().choices[0].text
    r2 = client(dep, tenants["globex"]).completions.with_raw_response.create(model="tiny", prompt="not me", max_tokens=3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logs = admin(dep, "GET", f"/admin/logs?tenant=acme&request_id={rid}")["data"]
        if logs:
            break
        time.sleep(0.2)
    # Stored after the redaction hook ran.
    assert logs[0]["request"]["prompt"] == "log me, mail [EMAIL]"
    assert logs[0]["response"]["choices"][0]["text"] == text
    assert admin(dep, "GET", f"/admin/logs?tenant=globex&request_id={r2.headers['x-request-id']}")["data"] == []


def stream_load(dep, keys: dict[str, str], n: int, concurrency: int, disconnect_every: int, seed: int = 0):
    """Bounded load: n streaming requests; every `disconnect_every`-th client
    walks away after its first token. Connection failures are expected while
    an ingress restarts; those requests never reach a scheduler."""
    rng = random.Random(seed)
    jobs = [(rng.choice(list(keys)), rng.randint(10, 60), i % disconnect_every == 0) for i in range(n)]

    async def one(http, sem, tenant, max_tokens, walk_away):
        async with sem:
            try:
                async with http.stream("POST", dep.url + "/v1/completions",
                                       headers={"Authorization": f"Bearer {keys[tenant]}"},
                                       json={"model": "tiny", "prompt": f"{tenant} says {max_tokens} " * 5,
                                             "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as resp:
                    async for line in resp.aiter_lines():
                        if walk_away and '"text"' in line:
                            return "disconnected"
                    return resp.status_code
            except (httpx.HTTPError, OSError):
                await asyncio.sleep(0.2)
                return "failed"

    async def run():
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*[one(http, sem, *j) for j in jobs])

    return asyncio.run(run())


@pytest.mark.slow
def test_exactly_once_metering_under_faults(dep, tenants):
    keys = {k: tenants[k] for k in ("acme", "globex", "initech")}
    before = dep_totals(dep)

    marks = {}

    def chaos():
        time.sleep(1.0)
        ray.kill(dep.meter, no_restart=False)
        time.sleep(1.0)
        ray.kill(dep.ingress, no_restart=False)
        marks["ingress_killed"] = time.monotonic()

    import threading

    t = threading.Thread(target=chaos)
    t.start()
    results = stream_load(dep, keys, n=200, concurrency=10, disconnect_every=4)
    load_end = time.monotonic()
    t.join()
    # The faults landed mid-load: some requests completed, some walked away,
    # some failed while the ingress was down.
    assert marks["ingress_killed"] < load_end
    assert "disconnected" in results and 200 in results and "failed" in results, results
    # The restarted ingress serves again on the same port.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(dep.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    after = stream_load(dep, keys, n=10, concurrency=5, disconnect_every=3, seed=1)
    assert after.count(200) >= 6, after  # the restarted ingress streams again
    results += after
    # Quiesce: nothing running, every usage event acknowledged by the Meter.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = ray.get([s.stats.remote() for s in dep.schedulers])
        if all(s.num_running == 0 and s.num_waiting == 0 and s.unacked_usage_events == 0 for s in stats):
            break
        time.sleep(0.5)
    assert all(s.unacked_usage_events == 0 for s in stats)
    engine = {}
    for s in stats:
        for tenant, t in s.tenant_totals.items():
            acc = engine.setdefault(tenant, dict.fromkeys(t, 0))
            for k, v in t.items():
                acc[k] += v
    ledger = ray.get(dep.meter.totals.remote())
    # Exactly once: one ledger row per engine request, per tenant. Tokens: the engine's
    # counts, except for the streams the killed ingress held, which are billed what their
    # clients received (the restarted ingress's "replica_failed" records supersede the
    # schedulers' events; scripts/chaos.py checks those against the clients' own counts).
    assert {t: v["requests"] for t, v in ledger.items()} == {t: v["requests"] for t, v in engine.items()}
    rows = usage_rows(dep)
    recorded = [r for r in rows if r["status"] == "replica_failed"]
    for tenant, v in engine.items():
        for k in ("prompt_tokens", "cached_tokens", "completion_tokens"):
            assert ledger[tenant][k] <= v[k], (tenant, k, ledger[tenant][k], v[k])
    if not recorded:
        assert ledger == engine
    ids = ray.get(dep.meter.event_ids.remote())
    assert len(ids) == len(set(ids)) == sum(t["requests"] for t in engine.values())
    assert dep_totals(dep) - before >= results.count(200)
    statuses = {row["status"] for row in usage_rows(dep)}
    assert "client_disconnected" in statuses


def dep_totals(dep) -> int:
    return sum(v["requests"] for v in ray.get(dep.meter.totals.remote()).values())


def usage_rows(dep) -> list[dict]:
    import sqlite3

    con = sqlite3.connect(ray.get(dep.meter.__ray_call__.remote(lambda self: self.plane.store.url)))
    rows = con.execute("SELECT status FROM usage_events").fetchall()
    return [{"status": r[0]} for r in rows]


def test_usage_report_and_no_plaintext_keys(dep, tenants):
    admin(dep, "PUT", "/admin/prices/tiny", json={"input_per_mtok": 1.0, "cached_input_per_mtok": 0.5,
                                                  "output_per_mtok": 2.0})
    rows = admin(dep, "GET", "/admin/usage?tenant=acme&by=model")["data"]
    assert rows and rows[0]["tenant"] and rows[0]["cost"] > 0
    csv = admin(dep, "GET", "/admin/usage?by=day&format=csv")
    assert csv.splitlines()[0].startswith("tenant,day,requests")
    # No key in plaintext: not in the database files, not in any Ray log.
    db = ray.get(dep.meter.__ray_call__.remote(lambda self: self.plane.store.url))
    blobs = [open(f, "rb").read() for f in glob.glob(db + "*")]
    logs = glob.glob("/tmp/ray/session_latest/logs/**/*", recursive=True)
    blobs += [open(f, "rb").read() for f in logs if not f.endswith((".sock",)) and _is_file(f)]
    for key in list(tenants.values()) + [ADMIN]:
        secret = key.encode()
        assert not any(secret in b for b in blobs), "a key leaked into a file"


def _is_file(path) -> bool:
    import os

    return os.path.isfile(path)
