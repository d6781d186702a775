"""Batched-LoRA kernels alone, at Llama-3.1-8B's decode shapes: the time of kernels/lora.py::add_lora
per projection (qkv, o, gate_up, down) against the base layer's matmul on the same tokens, replayed as
a CUDA graph (as decode runs them), for several adapter counts. No model is loaded: seconds.

    python -m ziggurat.scripts.bench_lora_kernels [--tokens 128] [--slots 32] [--adapters 1 8 32] [--rank 16]

Per row: us per call of the LoRA op and of the base matmul, their ratio, and the GB/s the LoRA op
moves (its adapters' A and B, x, and y read and written). The sum over the four projections times
the layer count is what LoRA adds to a decode step.
"""

from __future__ import annotations

import argparse
import sys

from ziggurat.scripts.report import emit

# (name, sub-module widths (out), in) at TP=1
PROJECTIONS = [("qkv", (4096, 1024, 1024), 4096), ("o", (4096,), 4096), ("gate_up", (14336, 14336), 4096),
               ("down", (4096,), 14336)]
LAYERS = 32


def graph_us(fn, reps: int = 50) -> float:
    """Median us of fn replayed from a CUDA graph (a warm-up call first)."""
    import torch
    import triton.testing

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=reps, return_mode="median")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=32, help="resident adapter slots (max_loras)")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32], help="distinct adapters in the batch")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from ziggurat.kernels.lora import add_lora, lora_batch

    dev = torch.device("cuda")
    dt = torch.bfloat16
    t, s, r = args.tokens, args.slots, args.rank
    res = {"bench": "lora_kernels", "machine": torch.cuda.get_device_name(), "tokens": t, "slots": s, "rank": r,
           "rows": []}
    print(f"{'proj':8s} {'adapters':>8s} {'lora us':>9s} {'base us':>9s} {'x base':>7s} {'GB/s':>7s}")
    for n_ad in args.adapters:
        slots = (np.arange(t) % n_ad).astype(np.int64)
        batch = lora_batch(slots, s, dev)
        total = 0.0
        for name, subs, k in PROJECTIONS:
            n = sum(subs)
            x = torch.randn(t, k, device=dev, dtype=dt)
            w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
            a = torch.randn(s, len(subs) * r, k, device=dev, dtype=dt) * 0.02
            b = torch.randn(s, n, r, device=dev, dtype=dt) * 0.02
            y = torch.zeros(t, n, device=dev, dtype=dt)
            lora_us = graph_us(lambda: add_lora(y, x, a, b, subs, batch))
            base_us = graph_us(lambda: torch.nn.functional.linear(x, w))
            moved = (min(n_ad, s) * (a[0].numel() + b[0].numel()) + x.numel() + 2 * y.numel()) * 2
            total += lora_us
            row = {"proj": name, "adapters": n_ad, "lora_us": lora_us, "base_us": base_us, "gb_s": moved / lora_us / 1e3}
            res["rows"].append(row)
            print(f"{name:8s} {n_ad:8d} {lora_us:9.1f} {base_us:9.1f} {lora_us / base_us:7.2f} {row['gb_s']:7.0f}",
                  flush=True)
        print(f"  {n_ad} adapters: {total:.1f} us a layer, {total * LAYERS / 1e3:.2f} ms a {LAYERS}-layer step")
        res[f"layer_us_{n_ad}"] = total
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
