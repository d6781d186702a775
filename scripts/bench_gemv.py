"""Decode's matrix-vector products: cuBLAS (torch.nn.functional.linear) against
kernels/gemv_triton.py, per Llama-3.1-8B shape and batch, as GB/s of weights
streamed and as a fraction of the copy bandwidth measured in the same run.

    python -m ziggurat.scripts.bench_gemv [--sweep] [--batches 1 2 4 8]

--sweep times every (block_n, block_k, warps, stages) on each shape and
prints the best per K and shape (what kernels/gemv_triton.py's TABLES hold per GPU).
"""

from __future__ import annotations

import argparse
import itertools
import sys

from ziggurat.scripts.report import emit

# (name, N, K) of Llama-3.1-8B at TP=1
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    import triton.testing

    from ziggurat.kernels import gemv_triton as G

    dev = "cuda"
    src = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    bw = 2 * src.numel() / copy_ms / 1e6  # GB/s, read + write
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    res = {"bench": "gemv", "machine": torch.cuda.get_device_name(), "copy_gb_s": bw, "rows": []}
    del src, dst
    best_cfg: dict[int, tuple] = {}
    if args.sweep:
        cfgs = list(itertools.product([4, 8, 16, 32], [256, 512, 1024], [4, 8], [1, 2, 3, 4]))
        for name, n, k in SHAPES:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, w)
            timed = []
            for c in cfgs:
                try:
                    y = G.gemv(x, w, config=c)
                    if not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
                        print(f"  {name} {c}: WRONG")
                        continue
                    timed.append((triton.testing.do_bench(lambda: G.gemv(x, w, config=c), warmup=10, rep=40), c))
                except Exception as e:  # out of resources for a shape
                    print(f"  {name} {c}: {type(e).__name__}")
            timed.sort()
            print(f"sweep {name:8} N={n:6} K={k:5}: best " + ", ".join(
                f"{c} {n * k * 2 / t / 1e6:.0f} GB/s" for t, c in timed[:4]), flush=True)
            # per K, keep the config that is best summed over that K's shapes (by bytes)
            for t, c in timed:
                res.setdefault("sweep", {}).setdefault(str(k), {}).setdefault(str(c), 0.0)
                res["sweep"][str(k)][str(c)] += t
            del w
        for k, by in res["sweep"].items():
            best = min(by, key=by.get)
            best_cfg[int(k)] = eval(best)  # noqa: S307 (our own tuple repr)
        print(f"best per K: {best_cfg}", flush=True)
    print(f"\n{'shape':<9}{'M':>3}{'cuBLAS us':>11}{'GB/s':>7}{'triton us':>11}{'GB/s':>7}{'speedup':>9}")
    for (name, n, k), m in itertools.product(SHAPES, args.batches):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        cfg = best_cfg.get(k)
        ref = torch.nn.functional.linear(x, w)
        y = G.gemv(x, w, config=cfg)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        tc = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), warmup=20, rep=100)
        tt = triton.testing.do_bench(lambda: G.gemv(x, w, config=cfg), warmup=20, rep=100)
        gb = n * k * 2 / 1e6
        print(f"{name:<9}{m:>3}{tc * 1e3:>11.1f}{gb / tc:>7.0f}{tt * 1e3:>11.1f}{gb / tt:>7.0f}{tc / tt:>9.3f}"
              f"   err {err:.1e}", flush=True)
        res["rows"].append({"shape": name, "n": n, "k": k, "m": m, "cublas_us": tc * 1e3, "triton_us": tt * 1e3,
                            "cublas_gb_s": gb / tc, "triton_gb_s": gb / tt, "rel_err": err})
        del w
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
