"""Batched-LoRA kernels alone, at Llama-3.1-8B's decode shapes: the time of kernels/lora.py::add_lora
per projection (qkv, o, gate_up, down) against the base layer's matmul on the same tokens, replayed as
a CUDA graph (as decode runs them), for several adapter counts and launch configs. No model is
loaded: seconds.

    python -m ziggurat.scripts.bench_lora_kernels [--tokens 128] [--slots 32] [--adapters 1 8 32] [--rank 16]
        [--configs default block_n=256 programs=512,k_per_split=256 ...]   # LoRAKernelConfig fields
        [--plan]                                                           # grids and bytes only, no GPU

A first sweep on a GPU (each config's rows, then its layer and step sums):

    python -m ziggurat.scripts.bench_lora_kernels --adapters 8 --configs default block_n=256 block_n=64 \
        programs=128 programs=512 k_per_split=256 max_splits=8 num_warps=8 block_k=64 min_groups=16

Per row: us per call of the LoRA op and of the base matmul, their ratio, the GB/s the LoRA op moves
(its adapters' A and B, x, and y read and written) and the config's grids. The sum over the four
projections times the layer count is what LoRA adds to a decode step. --plan prints, without a GPU,
each projection's grids, HBM bytes and the time they take at 4 TB/s plus 3 us a launch, and
the L2 bytes of the shrink's partials that the expand reads (which the configs trade).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from ziggurat.scripts.report import emit

# (name, sub-module widths (out), in) at TP=1
PROJECTIONS = [("qkv", (4096, 1024, 1024), 4096), ("o", (4096,), 4096), ("gate_up", (14336, 14336), 4096),
               ("down", (4096,), 14336)]
LAYERS = 32
HBM_BYTES_PER_US = 4e6  # 4 TB/s
LAUNCH_US = 3.0


def parse_config(text: str):
    """'default' or 'field=value,field=value' of kernels/lora_triton.py::LoRAKernelConfig."""
    from ziggurat.kernels.lora_triton import DEFAULT, LoRAKernelConfig

    if text == "default":
        return DEFAULT
    names = {f.name for f in dataclasses.fields(LoRAKernelConfig)}
    kw = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in names or not value:
            raise SystemExit(f"--configs: {part!r}: expected field=value, fields {', '.join(sorted(names))}")
        kw[key] = int(value)
    return LoRAKernelConfig(**kw)


def hbm_bytes(tokens: int, adapters: int, subs: tuple[int, ...], k: int, rank: int, elem: int = 2) -> int:
    """Bytes the op must move: each distinct adapter's A and B once, x read, y read and written."""
    n = sum(subs)
    return (adapters * (len(subs) * rank * k + n * rank) + tokens * k + 2 * tokens * n) * elem


def sub_runs(subs: tuple[int, ...], p) -> int:
    """Sum over the expand's column groups of the sub-modules each one's columns lie in."""
    ends = [sum(subs[: i + 1]) for i in range(len(subs))]
    n_blocks = -(-sum(subs) // p.block_n)
    total = 0
    for j in range(p.col_groups):
        first, last = j * p.blocks_per, min((j + 1) * p.blocks_per, n_blocks) - 1
        sub = lambda nb: sum(nb * p.block_n >= e for e in ends[:-1])  # noqa: E731
        total += sub(last) - sub(first) + 1
    return total


def grids(p) -> str:
    return f"{'x'.join(map(str, p.shrink_grid))}+{'x'.join(map(str, p.expand_grid))}"


def print_plan(args, configs) -> dict:
    from ziggurat.kernels.lora import max_tiles
    from ziggurat.kernels.lora_triton import plan

    t, r = args.tokens, args.rank
    n_tiles = max_tiles(t, args.slots)
    res = {"bench": "lora_kernels_plan", "tokens": t, "slots": args.slots, "rank": r, "rows": []}
    print(f"{t} tokens, {args.slots} slots ({n_tiles} tiles), rank {r}: bytes at 4 TB/s + {LAUNCH_US:g} us a launch")
    for label, cfg in configs:
        for n_ad in args.adapters:
            total = 0.0
            for name, subs, k in PROJECTIONS:
                p = plan(t, k, subs, r, n_tiles, cfg)
                moved = hbm_bytes(t, min(n_ad, args.slots), subs, k, r)
                # the expand's reads of the shrink's fp32 partials (L2): each program, each of its tiles,
                # the sub-modules its columns lie in
                used = max(-(-t // 16), min(n_ad, args.slots, t))
                partials = used * p.splits * 16 * r * 4 * sub_runs(subs, p)
                us = moved / HBM_BYTES_PER_US + 2 * LAUNCH_US
                total += us
                res["rows"].append({"config": label, "adapters": n_ad, "proj": name, "grids": grids(p),
                                    "mb": moved / 1e6, "partials_mb": partials / 1e6, "est_us": us})
                print(f"  {label:24s} {n_ad:3d} adapters {name:8s} grids {grids(p):16s} "
                      f"programs {math.prod(p.shrink_grid):4d}+{math.prod(p.expand_grid):4d} "
                      f"{moved / 1e6:6.1f} MB (+{partials / 1e6:4.1f} MB L2)  ~{us:5.1f} us")
            print(f"  {label} {n_ad} adapters: ~{total:.0f} us a layer, ~{total * LAYERS / 1e3:.2f} ms a step")
    return res


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
    ap.add_argument("--configs", nargs="+", default=["default"],
                    help="launch configs: 'default' or field=value,... of LoRAKernelConfig")
    ap.add_argument("--plan", action="store_true", help="print grids and byte estimates; no GPU needed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    configs = [(c, parse_config(c)) for c in args.configs]
    if args.plan:
        emit(print_plan(args, configs), args.json)
        return 0
    import numpy as np
    import torch

    from ziggurat.kernels import lora_triton
    from ziggurat.kernels.lora import lora_batch

    dev = torch.device("cuda")
    dt = torch.bfloat16
    t, s, r = args.tokens, args.slots, args.rank
    res = {"bench": "lora_kernels", "machine": torch.cuda.get_device_name(), "tokens": t, "slots": s, "rank": r,
           "rows": []}
    print(f"{'config':24s} {'proj':8s} {'adapters':>8s} {'lora us':>9s} {'base us':>9s} {'x base':>7s} "
          f"{'GB/s':>7s} grids")
    base = {}
    for label, cfg in configs:
        for n_ad in args.adapters:
            slots = (np.arange(t) % n_ad).astype(np.int64)
            batch = lora_batch(slots, s, dev)
            total = 0.0
            for name, subs, k in PROJECTIONS:
                n = sum(subs)
                x = torch.randn(t, k, device=dev, dtype=dt)
                a = torch.randn(s, len(subs) * r, k, device=dev, dtype=dt) * 0.02
                b = torch.randn(s, n, r, device=dev, dtype=dt) * 0.02
                y = torch.zeros(t, n, device=dev, dtype=dt)
                if not lora_triton.add_lora(y, x, a, b, subs, batch, cfg):
                    raise SystemExit(f"{label}: the kernels do not take {name}'s widths {subs}")
                lora_us = graph_us(lambda: lora_triton.add_lora(y, x, a, b, subs, batch, cfg))
                if name not in base:
                    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
                    base[name] = graph_us(lambda: torch.nn.functional.linear(x, w))
                    del w
                moved = hbm_bytes(t, min(n_ad, s), subs, k, r)
                total += lora_us
                p = lora_triton.plan(t, k, subs, r, batch.tile_slots.shape[0], cfg)
                row = {"config": label, "proj": name, "adapters": n_ad, "lora_us": lora_us, "base_us": base[name],
                       "gb_s": moved / lora_us / 1e3, "grids": grids(p)}
                res["rows"].append(row)
                print(f"{label:24s} {name:8s} {n_ad:8d} {lora_us:9.1f} {base[name]:9.1f} "
                      f"{lora_us / base[name]:7.2f} {row['gb_s']:7.0f} {row['grids']}", flush=True)
            print(f"  {label}, {n_ad} adapters: {total:.1f} us a layer, {total * LAYERS / 1e3:.2f} ms a "
                  f"{LAYERS}-layer step")
            res[f"layer_us_{label}_{n_ad}"] = total
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
