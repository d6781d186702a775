"""Control-plane ceiling: the whole HTTP -> router -> scheduler -> workers ->
HTTP path with a zero-cost executor (NullWorker) in the workers.

    python -m ziggurat.scripts.bench_control_plane [--concurrency 256] [--tp 1] [--json out.json]

Reports streamed tokens/s at N concurrent streams, and per-step
orchestration cost from the scheduler's own counters: `engine step` =
schedule + compiled-graph round trip to every rank + update; `loop
iteration` = wall time / steps while busy (adds sending the per-step
TokenBatch and draining the inbox).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray

    from ziggurat.cluster.deploy import Deployment, DeploymentSpec, default_model_dir
    from ziggurat.scripts.bench_serving import BenchConfig, run_benchmark

    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dep = Deployment(DeploymentSpec(
        model=str(default_model_dir()), served_model_name="null", port=port, tensor_parallel_size=args.tp,
        worker_cls="ziggurat.models.null_worker:NullWorker", num_kv_blocks=1 << 16, max_num_seqs=args.concurrency,
        max_waiting=4 * args.num_prompts, device="cpu"))
    try:
        sched = dep.schedulers[0]
        cfg = BenchConfig(base_url=dep.url, model="null", num_prompts=args.num_prompts, request_rate=math.inf,
                          max_concurrency=args.concurrency, random_input_len=args.input_len,
                          random_output_len=args.output_len, warmup_requests=4)
        before = ray.get(sched.stats.remote())
        t0 = time.perf_counter()
        m = asyncio.run(run_benchmark(cfg))
        wall = time.perf_counter() - t0
        after = ray.get(sched.stats.remote())
    finally:
        dep.shutdown()
        ray.shutdown()
    steps = after.steps - before.steps
    step_us = (after.step_seconds_total - before.step_seconds_total) / max(steps, 1) * 1e6
    result = dict(
        bench="control-plane", concurrency=args.concurrency, tp=args.tp, cpus=os.cpu_count(),
        completed=m["completed"], failed=m["failed"], output_tokens=m["total_output_tokens"],
        streamed_tok_s=m["output_throughput"], request_throughput=m["request_throughput"],
        steps=steps, engine_step_us=step_us, loop_iteration_us=m["duration"] / max(steps, 1) * 1e6,
        tokens_per_step=m["total_output_tokens"] / max(steps, 1),
        itl_p50_ms=m.get("median_itl_ms"), ttft_p50_ms=m.get("median_ttft_ms"), wall_s=wall,
        date=time.strftime("%Y-%m-%d"),
    )
    print(f"\nconcurrency {args.concurrency}, TP {args.tp}, {result['cpus']} CPUs")
    print(f"  streamed tokens/s          {result['streamed_tok_s']:10.0f}")
    print(f"  engine step (sched+graph)  {step_us:10.0f} us")
    print(f"  loop iteration (busy)      {result['loop_iteration_us']:10.0f} us")
    print(f"  tokens per step            {result['tokens_per_step']:10.1f}")
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0 if m["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
