"""Prefill/decode against a mixed replica, same model, same machine, one process.

    python -m ziggurat.scripts.bench_pd --model DIR [--gpus-per-worker 0.5] [--kv-blocks 12000] \\
        --input-len 2048 --output-len 128 --num-prompts 24 --rate 1 --json out.json
    python -m ziggurat.scripts.bench_pd --make llama:llama-3.1-8b --dtype bfloat16 ...

Deploys (a) one mixed replica, then (b) one prefill + one decode replica
(`--gpus-per-worker 0.5` puts both on one GPU, each a fractional share),
and for each:
  * greedy completions of --check-prompts random prompts (token ids, temperature 0):
    (b)'s text must equal (a)'s;
  * bench_serving at --rate req/s (Poisson) with --input-len / --output-len: TTFT, TPOT, ITL;
  * for (b): every KV pull the decode replica made (duration, bytes, backend), with
    p50 / p99 and the effective bandwidth (bytes read + written over the pull's time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--make", metavar="ARCH:PRESET")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--gpus-per-worker", type=float, default=0.5)
    ap.add_argument("--kv-blocks", type=int, default=None, help="KV blocks of each P/D replica (default: sized)")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--check-prompts", type=int, default=4)
    ap.add_argument("--check-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--only", choices=("mixed", "pd"), default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import requests as httpx  # on the GPU machine: requests, not httpx
    import ray
    import torch

    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec, PoolSpec
    from ziggurat.models.config import ModelConfig
    from ziggurat.scripts.bench_serving import BenchConfig, format_table, run_benchmark

    if args.make:
        from ziggurat.models.maker import make_model

        arch, preset = args.make.split(":")
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        args.model = str(make_model(tempfile.mkdtemp(prefix="pd-model-"), arch=arch, preset=preset,
                                    dtype=args.dtype or "bfloat16", device=dev, max_shard_bytes="5GB"))
    vocab = min(ModelConfig.from_dir(args.model).vocab_size, 10000)
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    rng = random.Random(3)
    checks = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.check_prompts)]
    common = dict(model=args.model, served_model_name="m", dtype=args.dtype, max_model_len=args.max_model_len,
                  device=args.device)
    out = {"bench": "pd", "machine": machine, "model": args.model, "input_len": args.input_len,
           "output_len": args.output_len, "rate": args.rate, "num_prompts": args.num_prompts,
           "date": time.strftime("%Y-%m-%d")}
    kinds = [k for k in ("mixed", "pd") if args.only in (None, k)]
    texts = {}
    for kind in kinds:
        if kind == "mixed":
            spec = DeploymentSpec.from_flat(**common, port=0)
        else:
            eng = {"num_kv_blocks": args.kv_blocks} if args.kv_blocks else {}
            spec = DeploymentSpec.from_flat(**common, port=0, pd_min_prompt_tokens=1,
                                            pools=(PoolSpec("prefill", 1, gpus_per_worker=args.gpus_per_worker,
                                                            engine=eng),
                                                   PoolSpec("decode", 1, gpus_per_worker=args.gpus_per_worker,
                                                            engine=eng)))
        t = time.perf_counter()
        dep = Deployment(spec)
        up = time.perf_counter() - t
        print(f"[{kind}] up in {up:.0f}s: " + ", ".join(f"replica {i.replica} {i.role} {i.num_blocks} blocks"
                                                       for i in dep.info), flush=True)
        try:
            texts[kind] = []
            for p in checks:
                r = httpx.post(dep.url + "/v1/completions", json={
                    "model": "m", "prompt": p, "max_tokens": args.check_tokens, "temperature": 0,
                    "ignore_eos": True}, timeout=300).json()
                texts[kind].append(r["choices"][0]["text"])
            cfg = BenchConfig(base_url=dep.url, model="m", num_prompts=args.num_prompts, request_rate=args.rate,
                              random_input_len=args.input_len, random_output_len=args.output_len, vocab_size=vocab,
                              warmup_requests=2, seed=11)
            m = asyncio.run(run_benchmark(cfg))
            m.pop("config", None)
            print(f"\n== {kind} ==\n" + format_table(m), flush=True)
            row = {"startup_s": up, **{k: m.get(k) for k in (
                "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
                "p99_itl_ms", "output_throughput", "failed", "completed")}}
            if kind == "pd":
                stats = ray.get(dep.schedulers[1].stats.remote())
                recs = [r for r in stats.recent_transfers if r[2] >= -(-args.input_len // 16) - 1]
                secs = sorted(r[4] for r in recs)
                if secs:
                    nbytes = statistics.median(r[3] for r in recs)
                    p50, p99 = statistics.median(secs), secs[min(len(secs) - 1, int(0.99 * len(secs)))]
                    row["transfers"] = {"count": len(secs), "backend": recs[0][1], "mbytes": nbytes / 1e6,
                                        "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "max_ms": secs[-1] * 1e3,
                                        "effective_tb_s": 2 * nbytes / p50 / 1e12}
                    print(f"KV pulls of {args.input_len}-token prompts in serving: {row['transfers']}", flush=True)
                row["pd_failures"] = stats.kv_transfer_failures
            out[kind] = row
        finally:
            dep.shutdown()
        time.sleep(2)
    if "mixed" in texts and "pd" in texts:
        out["greedy_equal"] = [a == b for a, b in zip(texts["mixed"], texts["pd"])]
        out["ttft_pd_over_mixed"] = out["pd"]["median_ttft_ms"] / out["mixed"]["median_ttft_ms"]
        print(f"\ngreedy P/D == mixed: {out['greedy_equal']}; median TTFT P/D / mixed = "
              f"{out['ttft_pd_over_mixed']:.3f}", flush=True)
    ray.shutdown()
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
