"""Chaos harness: streaming load from several tenants while actors are killed, then the books are checked.

    python -m ziggurat.scripts.chaos --kills 10 [--kinds worker scheduler router ingress meter] [--json out.json]

A CPU deployment of the embedded tiny model (2 replicas) serves streaming
completions from 3 tenants at a fixed concurrency; each kill (SIGKILL, via
ray.kill) of the given kinds comes in turn, under load. After each kill the
deployment must serve a normal request again within --recover-s. Checked at
the end, per HTTP request:
  * every request ended: 200 with [DONE], or a clean error (a shaped error
    event in the stream, a 4xx/5xx) within its deadline;
  * usage: the completion tokens billed for it (the ledger, by HTTP request
    id) equal the tokens its client received (counted from the stream's
    logprobs, one entry per token); nothing billed for a request refused
    before it streamed; no request id in the ledger twice (a primary key);
  * all KV blocks free once the load is over.
Streams cut by an ingress kill are also listed apart (their bill comes from
the dead ingress's delivery journal, read by its successor).

tests/cpu/test_chaos.py runs it with one kill of each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Outcome:
    http_id: str | None
    tenant: str
    status: int | None = None  # HTTP status (None: no response at all)
    received: int = 0  # tokens the client received
    done: bool = False  # [DONE] after a normal finish
    error: str | None = None  # error kind: stream_error, http_<code>, transport
    started: float = 0.0
    ended: float = 0.0
    during: str | None = None  # the kill in progress when it was cut, if any


@dataclass
class Report:
    requests: int = 0
    ok: int = 0
    clean_errors: int = 0
    unfinished: int = 0
    kills: list = field(default_factory=list)  # (kind, seconds to serve again)
    billing_mismatches: list = field(default_factory=list)
    ingress_cut: list = field(default_factory=list)  # (http id, received, billed) of streams cut by an ingress kill
    lost: int = 0
    leaked_blocks: int = 0
    supervisor: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)  # error kind -> count


async def _one(http, url, key, tenant, rng, deadline_s, current_kill) -> Outcome:
    import httpx

    out = Outcome(None, tenant, started=time.monotonic())
    body = {"model": "tiny", "prompt": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(8)),
            "max_tokens": rng.choice([8, 16, 32]), "ignore_eos": True, "stream": True, "logprobs": 0,
            "temperature": 0.8}
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, timeout=deadline_s,
                               headers={"Authorization": f"Bearer {key}"}) as r:
            out.status, out.http_id = r.status_code, r.headers.get("x-request-id")
            if r.status_code != 200:
                await r.aread()
                out.error = f"http_{r.status_code}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = out.error is None
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = "stream_error"
                    continue
                for c in chunk.get("choices", []):
                    if c.get("logprobs"):
                        out.received += len(c["logprobs"]["tokens"])
    except (httpx.HTTPError, OSError) as e:
        out.error = f"transport:{type(e).__name__}"
        out.during = current_kill[0]
    finally:
        out.ended = time.monotonic()
        if out.error and out.during is None:
            out.during = current_kill[0]
    return out


async def _load(url, keys, concurrency, stop, outcomes, deadline_s, current_kill, seed=0):
    import httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as http:
        async def worker(i):
            tenant, key = keys[i % len(keys)]
            while not stop.is_set():
                o = await _one(http, url, key, tenant, rng, deadline_s, current_kill)
                outcomes.append(o)
                if o.error:  # as a client would: back off a little before trying again
                    await asyncio.sleep(0.1)

        await asyncio.gather(*[worker(i) for i in range(concurrency)])


def _serves(url, key, timeout_s) -> float:
    """Seconds until a plain request is answered 200 again."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "ping", "max_tokens": 2},
                           headers={"Authorization": f"Bearer {key}"}, timeout=10)
            if r.status_code == 200:
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(0.2)
    return float("inf")


def _all_serving(dep, timeout_s) -> float:
    """Seconds until the supervisor reports every replica serving."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if all(s["state"] == "serving" for s in dep.status()):
            return time.monotonic() - t0
        time.sleep(0.2)
    return float("inf")


def _kill(dep, kind, rng) -> None:
    import ray

    if kind == "worker":
        ray.kill(rng.choice(rng.choice(dep.workers)), no_restart=True)
    elif kind == "scheduler":
        ray.kill(rng.choice(dep.schedulers), no_restart=True)
    elif kind == "router":
        ray.kill(dep.router, no_restart=False)
    elif kind == "ingress":
        ray.kill(rng.choice(dep.ingresses), no_restart=False)
    elif kind == "meter":
        ray.kill(dep.meter, no_restart=False)
    else:
        raise ValueError(kind)


def run(kinds, kills: int, concurrency: int = 8, recover_s: float = 30.0, gap_s: float = 2.0,
        model: str | None = None, seed: int = 0, log=print) -> Report:
    import ray

    from ziggurat.actors.meter.tenancy import TenantPlane
    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec, tiny_model_dir

    rng = random.Random(seed)
    db = tempfile.mkdtemp(prefix="chaos-") + "/ledger.db"
    plane = TenantPlane(db)
    keys = []
    for name in ("t1", "t2", "t3"):
        t = plane.tenants.create_tenant(name)
        key, _ = plane.tenants.create_key(t.tenant_id)
        keys.append((t.tenant_id, key))
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    dep = Deployment(DeploymentSpec.from_flat(
        model=model or str(tiny_model_dir()), served_model_name="tiny", port=0, replicas=2, num_kv_blocks=256,
        device="cpu", db=db, interval_s=0.25, health_timeout_s=5.0))
    report = Report()
    outcomes: list[Outcome] = []
    current_kill = [None]
    try:
        async def main():
            stop = asyncio.Event()
            load = asyncio.ensure_future(_load(dep.url, keys, concurrency, stop, outcomes, 60.0, current_kill, seed))
            await asyncio.sleep(gap_s)
            for kind in kinds:
                for _ in range(kills):
                    current_kill[0] = kind
                    await asyncio.get_running_loop().run_in_executor(None, _kill, dep, kind, rng)
                    took = await asyncio.get_running_loop().run_in_executor(None, _serves, dep.url, keys[0][1],
                                                                            recover_s)
                    full = await asyncio.get_running_loop().run_in_executor(None, _all_serving, dep, recover_s)
                    report.kills.append((kind, round(took, 2), round(full, 2)))
                    log(f"kill {kind}: serving again after {took:.1f} s, every replica serving after {full:.1f} s")
                    current_kill[0] = None
                    await asyncio.sleep(gap_s)
            stop.set()
            await asyncio.wait_for(load, 120)

        asyncio.run(main())
        # The books, once everything has settled.
        deadline = time.monotonic() + 60
        stats = None
        while time.monotonic() < deadline:
            try:
                stats = ray.get([s.stats.remote() for s in dep.schedulers])
                pending = ray.get([i.__ray_call__.remote(lambda self: len(self.server.records.pending))
                                   for i in dep.ingresses])
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):  # still restarting
                time.sleep(0.5)
                continue
            if (all(s.num_running == 0 and s.num_waiting == 0 and s.unacked_usage_events == 0 for s in stats)
                    and not any(pending)):
                break
            time.sleep(0.5)
        if stats is None:  # never settled: read them anyway (an error here is the harness's answer)
            stats = ray.get([s.stats.remote() for s in dep.schedulers])
        report.leaked_blocks = sum(s.num_blocks - s.num_free_blocks for s in stats)
        rows = plane.store.query("SELECT http_request_id, completion_tokens, status FROM usage_events")
        billed: dict[str, int] = {}
        for hid, c, _status in rows:
            billed[hid] = billed.get(hid, 0) + c
        report.supervisor = ray.get(dep.supervisor.history.remote())
    finally:
        dep.shutdown()
    report.requests = len(outcomes)
    for o in outcomes:
        if o.done:
            report.ok += 1
        elif o.error:
            report.clean_errors += 1
            kind = f"{o.error} during {o.during or 'no kill'}"
            report.errors[kind] = report.errors.get(kind, 0) + 1
        else:
            report.unfinished += 1
        if o.http_id is None:
            continue
        got = billed.get(o.http_id, 0)
        if o.during == "ingress" and o.error and o.error.startswith("transport"):
            report.ingress_cut.append((o.http_id, o.received, got))
        if o.status == 200 and got != o.received:
            report.billing_mismatches.append((o.http_id, o.received, got, o.error, o.during))
        if o.status == 200 and o.received and o.http_id not in billed:
            report.lost += 1
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=["worker", "scheduler", "router", "ingress", "meter"])
    ap.add_argument("--kills", type=int, default=10, help="kills of each kind, in a row")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--recover-s", type=float, default=30.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    r = run(args.kinds, args.kills, args.concurrency, args.recover_s)
    by_kind: dict[str, list] = {}
    full: dict[str, list] = {}
    for kind, s, f in r.kills:
        by_kind.setdefault(kind, []).append(s)
        full.setdefault(kind, []).append(f)
    print(f"\n{r.requests} requests in {time.monotonic() - t0:.0f} s: {r.ok} ok, {r.clean_errors} clean errors, "
          f"{r.unfinished} unfinished")
    for kind, ts in by_kind.items():
        ts = sorted(ts)
        fs = sorted(full[kind])
        print(f"  {kind:<10} {len(ts)} kills, serving again after median {ts[len(ts) // 2]:.1f} s (max {ts[-1]:.1f}), "
              f"every replica serving after median {fs[len(fs) // 2]:.1f} s (max {fs[-1]:.1f})")
    for kind, n in sorted(r.errors.items(), key=lambda kv: -kv[1]):
        print(f"  error {kind}: {n}")
    print(f"  billing mismatches: {len(r.billing_mismatches)}  lost: {r.lost}  leaked KV blocks: {r.leaked_blocks}")
    print(f"  streams cut by an ingress kill: {len(r.ingress_cut)}, received {sum(x[1] for x in r.ingress_cut)} "
          f"tokens, billed {sum(x[2] for x in r.ingress_cut)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(r), f, indent=1)
    ok = not r.billing_mismatches and not r.lost and not r.leaked_blocks and not r.unfinished and all(
        f <= args.recover_s for _, _, f in r.kills)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
