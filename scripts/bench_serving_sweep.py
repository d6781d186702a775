"""Deploy a model with `ziggurat serve`'s launcher and run bench_serving at
several request rates against it, in one process.

    python -m ziggurat.scripts.bench_serving_sweep --model DIR [--tp 1] --rates 1 4 16 inf \
        --num-prompts 32 --input-len 1024 --output-len 128 [--json out.json]
    python -m ziggurat.scripts.bench_serving_sweep --make llama:llama-3.1-8b --dtype bfloat16 ...
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
import tempfile
import time

from ziggurat.scripts.report import emit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--make", metavar="ARCH:PRESET")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ingresses", type=int, default=1)
    ap.add_argument("--rates", nargs="+", default=["1", "4", "16", "inf"])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192,
                    help="the per-step token budget, for the deployment and the offline peer alike")
    ap.add_argument("--device", default=None)
    ap.add_argument("--offline-peer", action="store_true",
                    help="after the sweep, run the same random workload through the offline engine (LLM) in this "
                         "process and report HTTP+Ray overhead at saturation against it")
    ap.add_argument("--policies", nargs="+", default=["default"], metavar="POLICY",
                    help="scheduling policies to compare, one deployment each, in this run: default (the "
                         "engine's), fcfs, or decode_first[:MAX_PREFILL_TOKENS]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray
    import torch

    from ziggurat.cluster.deploy import Deployment, DeploymentSpec
    from ziggurat.models.config import ModelConfig
    from ziggurat.scripts.bench_serving import BenchConfig, format_table, run_benchmark

    if args.make:
        from ziggurat.models.maker import make_model

        arch, preset = args.make.split(":")
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        t = time.perf_counter()
        args.model = str(make_model(tempfile.mkdtemp(prefix="sweep-model-"), arch=arch, preset=preset,
                                    dtype=args.dtype or "bfloat16", device=dev, max_shard_bytes="5GB"))
        print(f"made {args.make} in {time.perf_counter() - t:.0f}s", flush=True)
    vocab = ModelConfig.from_dir(args.model).vocab_size
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    policies = [_policy(p) for p in args.policies]
    by_policy = {}
    for name, engine_kw in policies:
        t = time.perf_counter()
        dep = Deployment(DeploymentSpec.from_flat(model=args.model, served_model_name="m", port=port,
                                                  tensor_parallel_size=args.tp, dtype=args.dtype,
                                                  max_model_len=args.max_model_len, device=args.device,
                                                  ingresses=args.ingresses,
                                                  max_num_batched_tokens=args.max_num_batched_tokens, **engine_kw))
        startup = time.perf_counter() - t
        print(f"[{name}] deployment up in {startup:.0f}s: {dep.info}", flush=True)
        rows = []
        try:
            for rate in args.rates:
                cfg = BenchConfig(base_url=dep.url, model="m", num_prompts=args.num_prompts,
                                  request_rate=math.inf if rate == "inf" else float(rate),
                                  random_input_len=args.input_len, random_output_len=args.output_len,
                                  vocab_size=min(vocab, 10000), warmup_requests=2 if not rows else 0,
                                  seed=1000 + len(rows))  # fresh prompts per rate, the same for every policy
                before, text0 = ray.get(dep.schedulers[0].stats.remote()), scrape(dep.url)
                m = asyncio.run(run_benchmark(cfg))
                after, text1 = ray.get(dep.schedulers[0].stats.remote()), scrape(dep.url)
                print(f"\n== [{name}] request rate {rate} ==\n" + format_table(m), flush=True)
                m.pop("config", None)
                m["scheduler"] = sched = step_phases(before, after)
                print("replica 0, per step: " + ", ".join(f"{k} {v:.0f} us" for k, v in sched["phase_us"].items())
                      + f"; loop iteration {sched['loop_iteration_us']:.0f} us over {sched['steps']} steps",
                      flush=True)
                # Where the client's ITL comes from: the replica's gaps between token steps (the
                # schedule), and each step's tokens from publish to the ingress (the delivery).
                m["server_step_gap_s"] = gaps = histogram_quantiles(text0, text1, "ziggurat_inter_token_latency_seconds")
                m["token_delivery_s"] = lag = histogram_quantiles(text0, text1, "ziggurat_token_delivery_seconds")
                for label, h in (("replica step gap", gaps), ("token delivery", lag)):
                    if h:
                        print(f"{label} p50 / p90 / p99: " + " / ".join(f"{1e3 * h[k]:.1f}" for k in ("p50", "p90", "p99"))
                              + f" ms ({h['count']} steps)", flush=True)
                rows.append(dict(rate=rate, policy=name, **m))
        finally:
            dep.shutdown()
        by_policy[name] = (rows, startup)
    ray.shutdown()
    rows = [r for name, _ in policies for r in by_policy[name][0]]
    startup = by_policy[policies[0][0]][1]
    summary = dict(bench="serving-sweep", machine=machine, model=args.model, tp=args.tp, dtype=args.dtype,
                   max_num_batched_tokens=args.max_num_batched_tokens, ingresses=args.ingresses,
                   input_len=args.input_len, output_len=args.output_len, num_prompts=args.num_prompts,
                   startup_s=startup, date=time.strftime("%Y-%m-%d"), policies=args.policies, runs=rows)
    sat = next((r for r in rows if r["rate"] == "inf"), None)
    if args.offline_peer and sat is not None:
        summary["offline"] = offline_peer(args, vocab, sat)
    keys = ["policy", "rate", "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2e_ms", "failed"]
    print("\n" + " ".join(f"{k:>15}" for k in keys))
    for r in rows:
        print(" ".join(f"{r.get(k):>15.2f}" if isinstance(r.get(k), float) else f"{str(r.get(k)):>15}" for k in keys))
    emit(summary, args.json)
    return 0


def policy_settings(spec: str) -> dict:
    """'default' | 'fcfs' | 'decode_first[:N][@MS]' -> engine settings (N: max_prefill_tokens; MS:
    target_step_ms, the prompt share sized by time)."""
    if spec == "default":
        return {}
    head, at, ms = spec.partition("@")
    name, _, n = head.partition(":")
    if name not in ("fcfs", "decode_first") or (at and name != "decode_first"):
        raise SystemExit(f"policy {spec!r}: default, fcfs, or decode_first[:MAX_PREFILL_TOKENS][@TARGET_STEP_MS]")
    kw: dict = {"schedule_policy": name}
    try:
        if n:
            kw["max_prefill_tokens"] = int(n)
        if at:
            kw["target_step_ms"] = float(ms)
    except ValueError:
        raise SystemExit(f"policy {spec!r}: N must be an integer and MS a number") from None
    return kw


def _policy(spec: str) -> tuple[str, dict]:
    return spec, policy_settings(spec)


def scrape(url: str) -> str:
    """The deployment's /metrics text."""
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=30) as r:
        return r.read().decode()


def histogram_quantiles(before: str, after: str, name: str, qs=(0.5, 0.9, 0.99)) -> dict | None:
    """Quantiles (seconds) of a Prometheus histogram's observations between two scrapes, summed over
    its series, by linear interpolation inside the bucket (a bucket's width bounds the error)."""
    import re

    def buckets(text):
        out: dict[float, float] = {}
        for le, v in re.findall(rf'^{name}_bucket{{[^}}]*le="([^"]+)"}} ([0-9.e+-]+)$', text, re.M):
            b = float("inf") if le == "+Inf" else float(le)
            out[b] = out.get(b, 0.0) + float(v)
        return out

    b0, b1 = buckets(before), buckets(after)
    edges = sorted(b1)
    cum = [b1[e] - b0.get(e, 0.0) for e in edges]
    total = cum[-1] if cum else 0
    if total <= 0:
        return None
    res = {"count": int(total)}
    for q in qs:
        k = next(i for i, c in enumerate(cum) if c >= q * total)
        lo, prev = (edges[k - 1], cum[k - 1]) if k else (0.0, 0.0)
        hi = edges[k] if edges[k] != float("inf") else lo
        res[f"p{round(q * 100)}"] = lo + (hi - lo) * (q * total - prev) / max(cum[k] - prev, 1e-12)
    return res


def step_phases(before, after) -> dict:
    """Where a replica's steps spent their time between two ReplicaStats: `wait`
    is waiting for the workers (the GPU step, less what host work overlapped)."""
    steps = max(after.steps - before.steps, 1)
    return {"steps": after.steps - before.steps,
            "loop_iteration_us": (after.busy_seconds_total - before.busy_seconds_total) / steps * 1e6,
            "phase_us": {k: (v - before.phase_seconds.get(k, 0.0)) / steps * 1e6 for k, v in after.phase_seconds.items()}}


def offline_peer(args, vocab: int, sat: dict) -> dict:
    """The saturation run's workload (same count, lengths, greedy, ignore_eos) through LLM.generate."""
    import random

    from ziggurat import LLM, SamplingParams

    rng = random.Random(7)  # prompts none of the online runs used
    prompts = [[rng.randrange(min(vocab, 10000)) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    # The same engine settings as the deployment: the difference is HTTP + Ray alone.
    llm = LLM(args.model, tensor_parallel_size=args.tp, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens, **({"device": args.device} if args.device else {}))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up, as the online run had
    t = time.perf_counter()
    llm.generate(prompts, params)
    secs = time.perf_counter() - t
    llm.shutdown()
    off = args.num_prompts * args.output_len / secs
    res = {"output_throughput": off, "seconds": secs,
           "online_over_offline": sat["output_throughput"] / off,
           "http_ray_overhead": 1 - sat["output_throughput"] / off}
    print(f"\noffline engine, same workload: {off:.0f} output tok/s; online at saturation "
          f"{sat['output_throughput']:.0f} = {res['online_over_offline']:.1%} of it "
          f"(overhead {res['http_ray_overhead']:.1%})", flush=True)
    return res


if __name__ == "__main__":
    sys.exit(main())
