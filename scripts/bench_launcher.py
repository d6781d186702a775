"""The launcher on a real model: NVML topology and telemetry from inside the actors, the
metrics and a trace of a real run, and the cost of tracing at saturation (off vs on, same call).

    python -m ziggurat.scripts.bench_launcher --model /tmp/llama8b --dtype bfloat16 \\
        --num-prompts 128 --input-len 1024 --output-len 128 --json out.json

Deploys one mixed replica twice (tracing off, then on to a file), runs
bench_serving at saturation against each, and reads /metrics and the spans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import tempfile
import time



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import ray
    import requests

    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec
    from ziggurat.models.config import ModelConfig
    from ziggurat.scripts.bench_serving import BenchConfig, run_benchmark
    from ziggurat.topology import nvml

    topo = nvml.read()
    out = {"bench": "launcher", "date": time.strftime("%Y-%m-%d"), "topology": topo.summary(),
           "topology_resources": nvml.resources(topo)}
    print("topology (driver):", json.dumps(out["topology"]), flush=True)
    vocab = min(ModelConfig.from_dir(args.model).vocab_size, 10000)
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    spans_path = os.path.join(tempfile.mkdtemp(), "spans.jsonl")
    for kind, endpoint in (("tracing_off", None), ("tracing_on", f"file://{spans_path}")):
        dep = Deployment(DeploymentSpec.from_flat(model=args.model, served_model_name="m", port=0,
                                                  dtype=args.dtype, device=args.device,
                                                  max_model_len=args.max_model_len, otlp_traces_endpoint=endpoint),
                         progress=lambda line: print("  " + line, flush=True))
        try:
            cfg = BenchConfig(base_url=dep.url, model="m", num_prompts=args.num_prompts, request_rate=math.inf,
                              random_input_len=args.input_len, random_output_len=args.output_len,
                              vocab_size=vocab, warmup_requests=2, seed=5)
            m = asyncio.run(run_benchmark(cfg))
            row = {k: m.get(k) for k in ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
                                         "p99_itl_ms", "failed", "completed")}
            text = requests.get(dep.url + "/metrics", timeout=30).text
            pick = lambda pat: [ln for ln in text.splitlines() if re.match(pat, ln)]  # noqa: E731
            row["metrics_sample"] = (pick(r"ziggurat_time_to_first_token_seconds_(count|sum)")
                                     + pick(r"ziggurat_request_success_total") + pick(r"ziggurat_gpu_")
                                     + pick(r"ziggurat_kv_cache_usage_perc"))
            row["histogram_series"] = len(pick(r"ziggurat_\w+_bucket"))
            out[kind] = row
            print(f"{kind}: {json.dumps(row, indent=1)}", flush=True)
        finally:
            dep.shutdown()
        time.sleep(2)
    spans = [json.loads(x) for x in open(spans_path)] if os.path.exists(spans_path) else []
    traces: dict = {}
    for s in spans:
        traces.setdefault(s["trace_id"], set()).add(s["name"])
    out["spans"] = len(spans)
    out["traces"] = len(traces)
    out["span_names_of_one_trace"] = sorted(next(iter(traces.values()))) if traces else []
    off, on = out["tracing_off"]["output_throughput"], out["tracing_on"]["output_throughput"]
    out["tracing_on_over_off"] = on / off if off else None
    print(f"tracing on / off output throughput: {out['tracing_on_over_off']:.3f}; {len(spans)} spans in "
          f"{len(traces)} traces; one trace: {out['span_names_of_one_trace']}", flush=True)
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k not in ("topology",)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
