"""Tenant-plane costs: ledger write throughput and admission-check latency.

    python -m ziggurat.scripts.bench_tenancy [--events 20000] [--db PATH] [--json out.json]

1. Metering: usage events/s the Meter sustains on SQLite (WAL, fsync on
   commit), in-process and through the MeterActor, for the batch sizes a
   scheduler's usage flusher sends.
2. Admission: the per-request cost the ingress adds before submitting —
   key -> tenant (cached), model allow-list, rpm/tpm/monthly checks and the
   reservation — as p50/p99 over many requests, with a live MeterActor
   behind the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid

from ziggurat.scripts.report import emit


def events(n: int, tenants: list[str]):
    from ziggurat.actors.meter.messages import UsageEvent

    now = time.time()
    return [UsageEvent(uuid.uuid4().hex, None, tenants[i % len(tenants)], None, "m", None, 0, "cpu", 100, 32, 50,
                       "length", now, now, 10.0, 100.0) for i in range(n)]


def bench_record(plane, n: int, batch: int) -> float:
    evs = events(n, ["t0", "t1", "t2"])
    t = time.perf_counter()
    for i in range(0, n, batch):
        plane.record(evs[i : i + batch])
    return n / (time.perf_counter() - t)


def bench_actor(meter, n: int, batch: int) -> float:
    import ray

    evs = events(n, ["t0", "t1", "t2"])
    t = time.perf_counter()
    for i in range(0, n, batch):
        ray.get(meter.record.remote(evs[i : i + batch]))
    return n / (time.perf_counter() - t)


async def bench_admission(meter, key: str, n: int) -> list[float]:
    from ziggurat.actors.ingress.gatekeeper import Gatekeeper

    gate = Gatekeeper(meter)
    await gate.start()
    p = await gate.authenticate(f"Bearer {key}")  # warm the cache
    await gate.limits(p.tenant_id)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        p = await gate.authenticate(f"Bearer {key}")
        adm = await gate.admit(p, "m", 200, 100)
        lat.append(time.perf_counter() - t)
        gate.release(adm, 250)
    gate._refresher.cancel()
    return lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--admissions", type=int, default=20000)
    ap.add_argument("--db", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray

    from ziggurat.actors.meter.tenancy import TenantPlane
    from ziggurat.actors.meter.actor import MeterActor

    db = args.db or tempfile.mkdtemp(prefix="bench-ledger-") + "/tenancy.db"
    plane = TenantPlane(db)
    res = {"bench": "tenancy", "db": "sqlite-wal-fsync", "date": time.strftime("%Y-%m-%d")}
    for batch in (1, 64, 512):
        n = min(args.events, 2000) if batch == 1 else args.events
        res[f"record_inprocess_batch{batch}_events_s"] = bench_record(plane, n, batch)
    tenant = plane.tenants.create_tenant("bench", requests_per_minute=10**9, tokens_per_minute=10**12)
    key, _ = plane.tenants.create_key(tenant.name)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        meter = MeterActor.remote(db)
        for batch in (64, 512):
            res[f"record_actor_batch{batch}_events_s"] = bench_actor(meter, args.events, batch)
        lat = asyncio.run(bench_admission(meter, key, args.admissions))
    finally:
        ray.shutdown()
    lat.sort()
    res["admission_p50_us"] = statistics.median(lat) * 1e6
    res["admission_p99_us"] = lat[int(len(lat) * 0.99)] * 1e6
    res["admission_max_us"] = lat[-1] * 1e6
    for k, v in res.items():
        print(f"  {k:<40} {v:>14.1f}" if isinstance(v, float) else f"  {k:<40} {v:>14}")
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
