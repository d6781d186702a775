"""Soak: a bounded run at a sustainable rate, watching every actor's memory.

    python -m ziggurat.scripts.soak --minutes 10 [--concurrency 4] [--warmup-minutes 2] [--json out.json]

A CPU deployment of the embedded tiny model (2 replicas, 2 ingresses) serves
a mix of streaming and plain completions and chats at a fixed concurrency.
Every --sample-s seconds it reads each actor process's resident memory
(/proc/<pid>/status, VmRSS). It passes if no request failed and every
actor's memory at the end is within --tolerance (10%) of what it was when
warm-up ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup-minutes", type=float, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=30)
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import httpx
    import ray

    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec, tiny_model_dir

    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    dep = Deployment(DeploymentSpec.from_flat(model=str(tiny_model_dir()), served_model_name="tiny", port=0,
                                              replicas=2, ingresses=2, num_kv_blocks=512, device="cpu"))
    actors = {"meter": dep.meter, "router": dep.router, "supervisor": dep.supervisor}
    actors.update({f"ingress{i}": a for i, a in enumerate(dep.ingresses)})
    actors.update({f"scheduler{r}": s for r, s in enumerate(dep.schedulers)})
    actors.update({f"worker{r}": ws[0] for r, ws in enumerate(dep.workers)})
    pids = {name: _pid(a) for name, a in actors.items()}
    samples: list[tuple[float, dict]] = []
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    t_end = time.monotonic() + args.minutes * 60
    t0 = time.monotonic()

    async def client(i):
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=60) as http:
            while time.monotonic() < t_end:
                kind = rng.choice(["stream", "plain", "chat"])
                try:
                    if kind == "chat":
                        r = await http.post(dep.url + "/v1/chat/completions", json={
                            "model": "tiny", "messages": [{"role": "user", "content": f"hello {rng.random()}"}],
                            "max_tokens": rng.choice([8, 32, 64])})
                        good = r.status_code == 200
                    elif kind == "plain":
                        r = await http.post(dep.url + "/v1/completions", json={
                            "model": "tiny", "prompt": f"once {rng.random()}", "max_tokens": rng.choice([8, 32]),
                            "n": rng.choice([1, 2])})
                        good = r.status_code == 200
                    else:
                        good = False
                        async with http.stream("POST", dep.url + "/v1/completions", json={
                                "model": "tiny", "prompt": f"stream {rng.random()}", "max_tokens": 64,
                                "stream": True, "ignore_eos": True}) as r:
                            async for line in r.aiter_lines():
                                good = good or line == "data: [DONE]"
                                if '"error"' in line:
                                    good = False
                                    break
                    counts["ok" if good else "failed"] += 1
                    if not good:
                        failures.append(f"{kind}: {getattr(r, 'status_code', '?')}")
                except Exception as e:
                    counts["failed"] += 1
                    failures.append(f"{kind}: {type(e).__name__}")
                await asyncio.sleep(rng.uniform(0, 0.05))

    async def sampler():
        while time.monotonic() < t_end:
            samples.append((time.monotonic() - t0, {n: round(_rss_mb(p), 1) for n, p in pids.items()}))
            print(f"t={samples[-1][0]:6.0f}s ok={counts['ok']} failed={counts['failed']} "
                  + " ".join(f"{n}={v:.0f}" for n, v in samples[-1][1].items()), flush=True)
            await asyncio.sleep(args.sample_s)
        samples.append((time.monotonic() - t0, {n: round(_rss_mb(p), 1) for n, p in pids.items()}))

    async def run():
        await asyncio.gather(sampler(), *[client(i) for i in range(args.concurrency)])

    try:
        asyncio.run(run())
        blocks = [(s.num_blocks, s.num_free_blocks) for s in ray.get([s.stats.remote() for s in dep.schedulers])]
    finally:
        dep.shutdown()
        ray.shutdown()
    warm = next(s for t, s in samples if t >= args.warmup_minutes * 60) if samples[-1][0] >= args.warmup_minutes * 60 \
        else samples[0][1]
    end = samples[-1][1]
    growth = {n: (end[n] - warm[n]) / warm[n] for n in warm if warm[n]}
    print(f"\n{counts['ok']} requests ok, {counts['failed']} failed in {time.monotonic() - t0:.0f} s "
          f"({counts['ok'] / (time.monotonic() - t0):.1f} req/s); KV blocks (total, free) at the end: {blocks}")
    for n in warm:
        print(f"  {n:<11} after warm-up {warm[n]:7.1f} MB   end {end[n]:7.1f} MB   {100 * growth.get(n, 0):+5.1f}%")
    if failures:
        print("  failures:", failures[:10])
    ok = counts["failed"] == 0 and all(g <= args.tolerance for g in growth.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": counts, "samples": samples, "growth": growth, "ok": ok}, f)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
