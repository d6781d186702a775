"""Control-plane ceiling: the whole HTTP -> router -> scheduler -> workers ->
HTTP path with a zero-cost executor (NullWorker) in the workers.

    python -m ziggurat.scripts.bench_control_plane [--concurrency 256] [--tp 1] [--step-us 0] [--json out.json]

Reports streamed tokens/s at N concurrent streams, and per-step
orchestration cost from the scheduler's own counters: `engine step` =
schedule + compiled-graph round trip to every rank + update; `loop
iteration` = time per step of the scheduler loop while it has work (adds
draining the inbox and handing the step's TokenBatches to the sender).

--step-us T makes every step occupy a simulated device for T us (the
NullWorker launches it and returns, like a GPU step; see
models/null_worker.py). The loop iteration minus T is then what the
control plane adds to a model step of that length: with async scheduling
the scheduler plans step N+1 while step N "runs", so only what does not
overlap shows. With T = 0 nothing can overlap and the loop iteration is
the control plane's whole serial cost per step.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
import time

from ziggurat.scripts.report import emit


def engine_only(num_requests: int, steps: int = 200) -> float:
    """Microseconds per EngineCore.step() for `num_requests` running decode
    requests, NullWorker in-process: the pure-Python scheduling cost, no Ray."""
    import random

    from ziggurat.actors.scheduler.engine import EngineCore
    from ziggurat.cluster.spec import tiny_model_dir
    from ziggurat.config import EngineConfig
    from ziggurat.models.null_worker import NullWorker
    from ziggurat.sampling_params import SamplingParams

    class InProcess:
        def __init__(self, cfg, max_len):
            self.w = NullWorker(cfg)

        def determine_num_blocks(self):
            return self.w.determine_num_blocks()

        def initialize_cache(self, n):
            pass

        def execute_async(self, step):
            return step

        def wait(self, step):
            return self.w.execute(step)

        def shutdown(self):
            pass

    eng = EngineCore(EngineConfig(model=str(tiny_model_dir()), num_kv_blocks=1 << 16, device="cpu",
                                  max_num_seqs=num_requests), executor_factory=InProcess)
    rng = random.Random(0)
    for i in range(num_requests):
        eng.add_request([rng.randrange(1000) for _ in range(128)], SamplingParams(max_tokens=10_000, ignore_eos=True))
    for _ in range(5):
        eng.step()  # prefill, then decode
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    return (time.perf_counter() - t) / steps * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ingresses", type=int, default=1, help="HTTP actors sharing the port")
    ap.add_argument("--step-us", type=float, default=0.0, help="simulated device time per step (0: zero-cost)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    in_process_us = engine_only(args.concurrency)

    import ray

    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec, tiny_model_dir
    from ziggurat.scripts.bench_serving import BenchConfig, run_benchmark

    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dep = Deployment(DeploymentSpec.from_flat(
        model=str(tiny_model_dir()), served_model_name="null", port=port, tensor_parallel_size=args.tp,
        worker_cls="ziggurat.models.null_worker:NullWorker", num_kv_blocks=1 << 16, max_num_seqs=args.concurrency,
        max_waiting=4 * args.num_prompts, device="cpu", ingresses=args.ingresses,
        extra={"null_step_us": args.step_us}))
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
        iters = ray.get(sched.recent_iterations.remote())
    finally:
        dep.shutdown()
        ray.shutdown()
    steps = after.steps - before.steps
    step_us = (after.step_seconds_total - before.step_seconds_total) / max(steps, 1) * 1e6
    loop_us = (after.busy_seconds_total - before.busy_seconds_total) / max(steps, 1) * 1e6
    # This run's iterations (the deque's tail): the median shows the steady state,
    # the mean adds the bursts (a wave of arrivals, a slow admission step).
    iters = sorted(iters[-steps:]) if steps else [0.0]
    pct = {f"p{q}": iters[min(len(iters) - 1, int(q / 100 * len(iters)))] * 1e6 for q in (50, 90, 99)}
    phases = {k: (v - before.phase_seconds.get(k, 0.0)) / max(steps, 1) * 1e6 for k, v in after.phase_seconds.items()}
    result = dict(
        bench="control-plane", concurrency=args.concurrency, tp=args.tp, ingresses=args.ingresses, cpus=os.cpu_count(),
        completed=m["completed"], failed=m["failed"], output_tokens=m["total_output_tokens"],
        streamed_tok_s=m["output_throughput"], request_throughput=m["request_throughput"],
        steps=steps, simulated_step_us=args.step_us, engine_step_us=step_us, loop_iteration_us=loop_us,
        added_per_step_us=loop_us - args.step_us, phase_us=phases, loop_iteration_pct_us=pct,
        added_per_step_p50_us=pct["p50"] - args.step_us,
        scheduler_gc_ms=[(a - b) * 1e3 for a, b in zip(after.gc_seconds, before.gc_seconds)],
        scheduler_gc_collections=[a - b for a, b in zip(after.gc_collections, before.gc_collections)], wall_per_step_us=m["duration"] / max(steps, 1) * 1e6,
        tokens_per_step=m["total_output_tokens"] / max(steps, 1),
        engine_only_step_us=in_process_us, itl_p50_ms=m.get("median_itl_ms"), ttft_p50_ms=m.get("median_ttft_ms"), wall_s=wall,
        date=time.strftime("%Y-%m-%d"),
    )
    print(f"\nconcurrency {args.concurrency}, TP {args.tp}, {result['cpus']} CPUs, simulated step {args.step_us:.0f} us")
    print(f"  streamed tokens/s          {result['streamed_tok_s']:10.0f}")
    print(f"  engine step (sched+graph)  {step_us:10.0f} us")
    print(f"  loop iteration (busy)      {loop_us:10.0f} us  (added to the step: {loop_us - args.step_us:.0f} us)")
    print("  loop iteration percentiles: " + ", ".join(f"{k} {v:.0f} us" for k, v in pct.items()))
    print("  per step: " + ", ".join(f"{k} {v:.0f} us" for k, v in phases.items()))
    print(f"  scheduler GC pauses (gen 0/1/2): {result['scheduler_gc_collections']} collections, "
          + "/".join(f"{x:.1f}" for x in result["scheduler_gc_ms"]) + " ms")
    print(f"  tokens per step            {result['tokens_per_step']:10.1f}")
    print(f"  engine step, no Ray, {args.concurrency} decoding: {in_process_us:6.0f} us")
    emit(result, args.json)
    return 0 if m["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
