"""Greedy output of a TP=N replica equals TP=1's, over HTTP, on one machine.

    python -m ziggurat.scripts.check_tp_greedy --make llama:llama-3.1-8b --tp 2 [--dtype bfloat16] [--json out.json]

Deploys the model with tensor_parallel_size=1, collects greedy completions
for fixed prompts through the OpenAI API, shuts it down, deploys it again
with --tp (NCCL on GPUs, gloo on CPUs), and compares token by token
(logprobs=0 returns the token ids' text pieces; the comparison is on text and
on the first position that differs). In bf16 a different all-reduce order can
flip a near-tie; --dtype float32 removes that source.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from ziggurat.scripts.report import emit



def run(model: str, tp: int, dtype: str | None, prompts: list[str], max_tokens: int, device: str | None) -> list[list[str]]:
    import httpx

    from ziggurat.cluster.deploy import Deployment, DeploymentSpec
    from ziggurat.models.config import ModelConfig

    dep = Deployment(DeploymentSpec.from_flat(model=model, served_model_name="m", port=0, tensor_parallel_size=tp,
                                    dtype=dtype, max_model_len=min(4096, ModelConfig.from_dir(model).max_position_embeddings),
                                    device=device))
    try:
        outs = []
        for p in prompts:
            r = httpx.post(dep.url + "/v1/completions", timeout=600, json={
                "model": "m", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
                "ignore_eos": True})
            r.raise_for_status()
            outs.append(r.json()["choices"][0]["logprobs"]["tokens"])
        return outs
    finally:
        dep.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--make", metavar="ARCH:PRESET")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import ray
    import torch

    if args.make:
        from ziggurat.models.maker import make_model

        arch, preset = args.make.split(":")
        args.model = str(make_model(tempfile.mkdtemp(prefix="tp-model-"), arch=arch, preset=preset,
                                    dtype=args.dtype or "bfloat16", max_shard_bytes="5GB",
                                    device="cuda" if torch.cuda.is_available() else "cpu"))
    prompts = ["The capital of France is", "def fibonacci(n):", "In 1969, the first humans",
               "Once upon a time, in a land far away,", "1, 2, 3, 5, 8, 13,", "Ray is a framework for"]
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR")
    try:
        t = time.perf_counter()
        ref = run(args.model, 1, args.dtype, prompts, args.max_tokens, args.device)
        got = run(args.model, args.tp, args.dtype, prompts, args.max_tokens, args.device)
        secs = time.perf_counter() - t
    finally:
        ray.shutdown()
    rows = []
    for p, a, b in zip(prompts, ref, got):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        rows.append({"prompt": p, "equal": a == b, "first_difference": first})
        print(f"{'EQUAL' if a == b else 'DIFF @' + str(first):>10}  {p!r}")
    res = {"check": "tp-greedy", "tp": args.tp, "dtype": args.dtype, "model": args.model,
           "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "all_equal": all(r["equal"] for r in rows), "rows": rows, "seconds": secs,
           "date": time.strftime("%Y-%m-%d")}
    emit(res, args.json)
    return 0 if res["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
