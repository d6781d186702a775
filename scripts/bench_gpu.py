"""The GPU-performance issue's benchmarks in one process, each next to its peer
measured in the same run: the roofline from bandwidth and FLOP/s measured here,
and HF transformers `generate` on the same model, dtype, batch and device.

    python -m ziggurat.scripts.bench_gpu --make llama:llama-3.1-8b --dtype bfloat16 \
        --workloads roofline decode1 prefill offline_long offline_gen [--hf] [--json out.json]
    python -m ziggurat.scripts.bench_gpu --smoke            # tiny shapes, any machine (checks the script)

Workloads (defaults are the issue's; --smoke shrinks them):
  roofline     device-to-device copy (bytes read + written) and a large bf16 matmul (always run)
  decode1      batch-1 decode: 128-token prompt, 512 new tokens -> tok/s; roofline = bandwidth / weight bytes
  prefill      one 4096-token prompt, max_tokens=1 -> seconds, achieved TFLOP/s and MFU vs the measured matmul rate
  offline_long 32 requests x 4096 in / 32 out -> total tok/s
  offline_gen  128 requests x 32 in / 2048 out -> total tok/s
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from ziggurat.scripts.report import emit


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, reps: int) -> float:
    """fn's median wall time over `reps` synchronized calls, after one warm-up call."""
    fn()
    _sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def roofline(smoke: bool) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = (1 << 20) if smoke else (1 << 30)  # bytes per buffer
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=dev).random_()
    b = torch.empty_like(a)
    m = 512 if smoke else 8192
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    y = torch.randn_like(x)

    copy_s = median_seconds(lambda: b.copy_(a), 10)
    mm_s = median_seconds(lambda: x @ y, 10)
    return {"bandwidth_gb_s": 2 * n / copy_s / 1e9, "matmul_tflop_s": 2 * m**3 / mm_s / 1e12}


def weight_bytes(model_dir: str) -> int:
    from pathlib import Path

    from ziggurat.models.loader import checkpoint_files

    return sum(f.stat().st_size for f in checkpoint_files(Path(model_dir)))


def prompts_of(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(min(vocab, 10000)) for _ in range(length)] for _ in range(n)]


def run_engine(llm, make_prompts, max_tokens: int, reps: int) -> float:
    """Median seconds of `reps` generate calls; each call gets fresh prompts
    (make_prompts(rep)) so none is served from the prefix cache."""
    from ziggurat import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(make_prompts(-1)[:1], SamplingParams(max_tokens=2, ignore_eos=True))
    ts = []
    for rep in range(reps):
        prompts = make_prompts(rep)
        _sync()
        t = time.perf_counter()
        llm.generate(prompts, params)
        _sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run_hf(model_dir, dtype, prompts, max_tokens) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype) if dtype else "auto").to(dev)
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, device=dev)  # equal lengths: no padding
    model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
    _sync()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    _sync()
    secs = time.perf_counter() - t
    del model
    return secs


def profile(llm, cfg, shrink: int) -> None:
    """Where a decode step's time goes: torch.profiler's top ops for batch 1 and batch 128."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ziggurat import SamplingParams

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for batch in (1, 128 // shrink):
        p = prompts_of(batch, 128 // shrink, cfg.vocab_size, seed=3)
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        llm.generate(p, params)
        _sync()
        with torch_profile(activities=acts) as prof:
            t = time.perf_counter()
            llm.generate(p, params)
            _sync()
            wall = time.perf_counter() - t
        print(f"\n== profile: batch {batch}, 128-token prompts, 32 new tokens: {wall * 1e3:.1f} ms wall "
              f"({wall / 32 * 1e3:.2f} ms/step incl. prefill)")
        key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)
        if torch.cuda.is_available():
            gpu_idle_report(prof, steps=32)
            if os.environ.get("OUT"):
                prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"trace_batch{batch}.json"))


def gpu_idle_report(prof, steps: int) -> None:
    """How busy the GPU was between its first and last kernel: the union of
    kernel intervals, and the largest idle gaps with the kernels around them."""
    from torch.autograd import DeviceType

    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    if not ev:
        return
    busy, gaps, end = 0.0, [], ev[0][0]
    prev = ""
    for a, b, name in ev:
        if a > end:
            gaps.append((a - end, prev, name))
        busy += max(0.0, b - max(a, end))
        if b > end:
            end, prev = b, name
    span = end - ev[0][0]
    gaps.sort(reverse=True)
    total_gap = sum(g for g, *_ in gaps)
    print(f"GPU busy {busy / 1e3:.2f} ms of {span / 1e3:.2f} ms ({busy / span:.1%}); {len(ev)} device ops "
          f"({len(ev) / steps:.0f} per step); idle {total_gap / 1e3:.2f} ms in {len(gaps)} gaps "
          f"({total_gap / steps:.0f} us per step); gaps > 20 us: {sum(1 for g, *_ in gaps if g > 20)} "
          f"totalling {sum(g for g, *_ in gaps if g > 20) / 1e3:.2f} ms")
    for g, before, after in gaps[:12]:
        print(f"  gap {g:8.1f} us  after {before[:60]!r}  before {after[:60]!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--make", metavar="ARCH:PRESET")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workloads", nargs="+", default=["roofline", "decode1", "prefill", "offline_long", "offline_gen"])
    ap.add_argument("--hf", action="store_true", help="also time HF transformers generate on decode1 and offline_long")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="the per-step token budget")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on any machine")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's top kernels for a batch-1 and a batch-128 decode")
    args = ap.parse_args(argv)
    import torch

    from ziggurat import LLM
    from ziggurat.models.config import ModelConfig

    if args.smoke and not (args.model or args.make):
        args.make, args.dtype = "llama:tiny", "float32"
    if args.make:
        from ziggurat.models.maker import make_model

        arch, preset = args.make.split(":")
        args.model = str(make_model(tempfile.mkdtemp(prefix="bench-gpu-"), arch=arch, preset=preset, dtype=args.dtype,
                                    max_shard_bytes="5GB", device="cuda" if torch.cuda.is_available() else "cpu"))
    cfg = ModelConfig.from_dir(args.model)
    s = 8 if args.smoke else 1  # shrink factor
    res: dict = {"bench": "gpu", "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "model": args.model, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"), "workloads": {}}
    rows = []
    hf_jobs = []  # (workload, prompts, max_tokens, record(seconds)), run once the engine is gone

    def row(name, a, b):
        rows.append((name, a, b))
        print(f"{name:<18}{a:<40}{b}", flush=True)

    roof = res["roofline"] = roofline(args.smoke)  # every other figure is read against it
    row("roofline", f"{roof['bandwidth_gb_s']:.0f} GB/s copy, {roof['matmul_tflop_s']:.0f} TFLOP/s matmul", "")
    kw = dict(dtype=args.dtype, max_model_len=min(cfg.max_position_embeddings, 8192 // (s if args.smoke else 1) + 64))
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = res["max_num_batched_tokens"] = args.max_num_batched_tokens
    if torch.cuda.is_available():
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        kw["num_kv_blocks"] = 2048
    t0 = time.perf_counter()
    llm = LLM(args.model, **kw)
    res["startup_s"] = time.perf_counter() - t0
    runner = getattr(llm.engine.executor, "worker", None) and llm.engine.executor.worker.runner
    if runner is not None:
        res["load_s"] = runner.load_seconds
        res["cuda_graph_capture_s"] = runner.graphs.capture_seconds if runner.graphs else None
    row("startup", f"{res['startup_s']:.1f} s", f"weights {res.get('load_s', 0):.1f} s, CUDA graphs "
        f"{res.get('cuda_graph_capture_s') or 0:.1f} s, KV blocks {llm.engine.kv.num_blocks}")
    wbytes = weight_bytes(args.model)
    if "decode1" in args.workloads:
        p, new = prompts_of(1, 128 // s, cfg.vocab_size), 512 // s
        secs = run_engine(llm, lambda rep: prompts_of(1, 128 // s, cfg.vocab_size, seed=100 + rep), new, args.reps)
        tok_s = new / secs
        bound = roof["bandwidth_gb_s"] * 1e9 / wbytes
        r = {"tok_s": tok_s, "roofline_tok_s": bound, "fraction_of_roofline": tok_s / bound}
        if args.hf:
            hf_jobs.append(("decode1", p, new, lambda secs, r=r: r.update(hf_tok_s=new / secs)))
        res["workloads"]["decode1"] = r
        row("decode1", f"{tok_s:.1f} tok/s", f"{tok_s / bound:.0%} of {bound:.0f} tok/s roofline")
    if "prefill" in args.workloads:
        n = 4096 // s
        secs = run_engine(llm, lambda rep: prompts_of(1, n, cfg.vocab_size, seed=200 + rep), 1, args.reps)
        # 2 FLOPs per parameter per token (the usual estimate; it counts the
        # embedding table too) plus causal attention's QK^T and PV (half of n^2 each).
        params = wbytes / cfg.dtype.itemsize
        flops = 2 * params * n + 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * n
        tflops = flops / secs / 1e12
        res["workloads"]["prefill"] = {"seconds": secs, "tflop_s": tflops, "mfu": tflops / roof["matmul_tflop_s"]}
        row("prefill", f"{secs * 1e3:.1f} ms for {n} tokens", f"{tflops:.0f} TFLOP/s, MFU "
                     f"{tflops / roof['matmul_tflop_s']:.0%} of measured matmul")
    for name, (n, lin, lout) in {"offline_long": (32, 4096, 32), "offline_gen": (128, 32, 2048)}.items():
        if name not in args.workloads:
            continue
        n, lin, lout = n // s or 1, lin // s, lout // s
        p = prompts_of(n, lin, cfg.vocab_size, seed=2)
        secs = run_engine(llm, lambda rep, n=n, lin=lin: prompts_of(n, lin, cfg.vocab_size, seed=300 + rep), lout,
                          max(1, args.reps - 1))
        r = {"seconds": secs, "total_tok_s": n * (lin + lout) / secs, "output_tok_s": n * lout / secs}
        if args.hf and name == "offline_long":
            hf_jobs.append((name, p, lout, lambda secs, r=r, k=n * (lin + lout): r.update(hf_total_tok_s=k / secs)))
        res["workloads"][name] = r
        row(name, f"{r['total_tok_s']:.0f} total tok/s", f"{n} x {lin} in / {lout} out")
    if args.profile:
        profile(llm, cfg, s)
    llm.shutdown()
    del llm, runner  # the runner holds the weights, KV cache and CUDA graphs
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # HF peers run after the engine let go of its KV cache (it holds most of the GPU).
    for name, p, new, record in hf_jobs:
        record(run_hf(args.model, args.dtype, p, new))
        got = res["workloads"][name]
        row(f"{name} (HF)", f"{got.get('hf_tok_s') or got.get('hf_total_tok_s'):.1f} tok/s"
            if "hf_tok_s" in got else f"{got['hf_total_tok_s']:.0f} total tok/s", "transformers generate, same inputs")
    print()
    for name, a, b in rows:
        print(f"{name:<18}{a:<40}{b}")
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
