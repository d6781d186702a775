"""FP8 against bf16 on one model, in one process: the issue's FP8 workloads per configuration,
the roofline measured in the same run, and how far the FP8 tokens follow the bf16 ones.

    python -m ziggurat.scripts.bench_fp8 --make llama:llama-3.1-8b [--fp8-model DIR] [--json out.json]
    python -m ziggurat.scripts.bench_fp8 --tiny          # tiny shapes, any machine (checks the script)

Configurations (--configs; each its own engine, started after the last one let go of the GPU):
  bf16       the checkpoint as written
  fp8        FP8 weights: --fp8-model's checkpoint (make-model --quantize fp8) or, without it,
             --quantization fp8 (quantize-at-load; the same weights either way)
  fp8-kv8    FP8 weights and --kv-cache-dtype fp8
  fp8-dequant  FP8 weights with ZIGGURAT_FP8_GEMM=dequant (weight-only everywhere: the A/B of
             the W8A8 scaled_mm prefill; not in the default list)

Workloads per configuration:
  decode1      batch 1, 128-token prompt, 512 new tokens -> tok/s; its roofline = copy bandwidth /
               the bytes one decode step reads (every weight but the embedding table)
  offline_gen  128 x 32 in / 2048 out -> total tok/s
  offline_long 32 x 4096 in / 32 out -> total tok/s
  agreement    16 prompts, the first --agree-tokens greedy tokens against bf16's (when bf16 ran):
               the matching prefix and the fraction of equal positions; and, as check_logits
               does, the logits of 2 prompts' every position (one prefill through the engine's
               model): relative error against bf16's and how often the argmax agrees
Always: the copy bandwidth and the bf16 and fp8 matmul rates (roofline). --gemv-sweep also times
the fp8 GEMV's launch candidates on the model's weight shapes (batch 1) and prints the fastest
per shape for kernels/fp8_triton.py::CONFIGS. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

from ziggurat.scripts.bench_gpu import median_seconds, prompts_of, run_engine
from ziggurat.scripts.check_logits import prefill_logits
from ziggurat.scripts.report import emit

CONFIGS = {
    "bf16": ({}, {}),
    "fp8": ({"quantization": "fp8"}, {}),
    "fp8-kv8": ({"quantization": "fp8", "kv_cache_dtype": "fp8"}, {}),
    "fp8-dequant": ({"quantization": "fp8"}, {"ZIGGURAT_FP8_GEMM": "dequant"}),
}


def roofline(tiny: bool) -> dict:
    """Copy bandwidth (bytes read + written), and bf16 / fp8 (torch._scaled_mm, row-wise) matmul rates."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = (1 << 20) if tiny else (1 << 30)
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=dev).random_()
    b = torch.empty_like(a)
    m = 256 if tiny else 8192
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    y = torch.randn_like(x)
    x8, y8 = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device=dev), torch.ones(1, m, device=dev)
    out = {"bandwidth_gb_s": 2 * n / median_seconds(lambda: b.copy_(a), 10) / 1e9,
           "bf16_matmul_tflop_s": 2 * m**3 / median_seconds(lambda: x @ y, 10) / 1e12}
    mm8 = lambda: torch._scaled_mm(x8, y8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    try:
        out["fp8_matmul_tflop_s"] = 2 * m**3 / median_seconds(mm8, 10) / 1e12
    except RuntimeError as e:  # no FP8 tensor cores
        out["fp8_matmul_error"] = str(e).splitlines()[0]
    return out


def decode_bytes(runner) -> int:
    """Bytes a batch-1 decode step reads: every parameter but the embedding table (one row of it is read),
    each once (a tied LM head counts once, as the LM head)."""
    seen, total = set(), 0
    emb = runner.model.embed_tokens.weight
    for name, p in runner.model.named_parameters():
        if id(p) in seen or (p is emb and not runner.cfg.tie_word_embeddings):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def logits_vs(ref: list, got: list) -> dict:
    num = sum(float((g - r).norm() ** 2) for r, g in zip(ref, got)) ** 0.5
    den = sum(float(r.norm() ** 2) for r in ref) ** 0.5
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for r, g in zip(ref, got)) / sum(len(r) for r in ref)
    return {"rel_err": num / den, "argmax_agreement": agree}


def greedy_tokens(llm, prompts, n: int) -> list[list[int]]:
    from ziggurat import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    """The matching prefix (mean over prompts, in tokens and as a fraction) and the share of equal positions."""
    prefixes, equal, total = [], 0, 0
    for a, b in zip(ref, got):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(k)
        equal += sum(x == y for x, y in zip(a, b))
        total += len(a)
    n = len(ref[0])
    mean = statistics.mean(prefixes)
    return {"tokens": n, "mean_prefix": mean, "mean_prefix_fraction": mean / n, "prompts": len(ref),
            "full_match_prompts": sum(k == n for k in prefixes), "position_agreement": equal / total}


def gemv_sweep(cfg, tiny: bool) -> dict:
    """Batch-1 fp8 GEMV on the model's (N, K) weight shapes at TP=1: GB/s of the default
    launch and of each candidate; the fastest per shape."""
    import torch

    from ziggurat.kernels import fp8_triton as FT
    from ziggurat.models.quantization import quantize_weight

    dev = "cuda"
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = [((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, h), (h, cfg.num_heads * cfg.head_dim),
              (2 * i, h), (h, i)]
    cands = [(bn, bk, w, s) for bn in (2, 4, 8, 16) for bk in (1024, 2048, 4096) for w in (4, 8) for s in (2, 3)]
    out = {}
    for n, k in shapes:
        wq, ws = quantize_weight(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)

        def rate(c):
            secs = median_seconds(lambda: FT.fp8_gemv(x, wq, ws, config=c), 20)
            return n * k / secs / 1e9  # weight bytes (fp8) per second

        res = {"default": rate(None), "default_config": list(FT.CONFIGS.get((n, k), FT.DEFAULT_CONFIG))}
        best = max(cands, key=lambda c: res.setdefault(str(c), rate(c)))
        res["best"], res["best_gb_s"] = list(best), res[str(best)]
        out[f"{n}x{k}"] = res
        print(f"gemv fp8 {n}x{k}: default {res['default']:.0f} GB/s, best {best} {res['best_gb_s']:.0f} GB/s",
              flush=True)
    return out


def run_config(name, model, fp8_model, kw, cfg, args, s, roof, ref, agree_prompts) -> dict:
    """One configuration's engine and workloads; ref: bf16's agreement tokens and logits (bf16 fills it)."""
    from ziggurat import LLM

    engine_kw, extra_env = CONFIGS[name]
    path = fp8_model if fp8_model and engine_kw.get("quantization") else model
    engine_kw = {k: v for k, v in engine_kw.items() if not (k == "quantization" and path == fp8_model)}
    saved = {k: os.environ.get(k) for k in extra_env}
    os.environ.update(extra_env)
    out: dict = {"model": path, **engine_kw, **{f"env_{k}": v for k, v in extra_env.items()}}
    try:
        t0 = time.perf_counter()
        llm = LLM(path, **kw, **engine_kw)
        out["startup_s"] = time.perf_counter() - t0
        runner = llm.engine.executor.worker.runner
        out["load_s"], out["kv_blocks"] = runner.load_seconds, llm.engine.kv.num_blocks
        out["decode_bytes"] = decode_bytes(runner)
        if "decode1" in args.workloads:
            new = max(8, 512 // s)
            secs = run_engine(llm, lambda rep: prompts_of(1, max(8, 128 // s), cfg.vocab_size, seed=100 + rep), new,
                              args.reps)
            bound = roof["bandwidth_gb_s"] * 1e9 / out["decode_bytes"]
            out["decode1"] = {"tok_s": new / secs, "roofline_tok_s": bound, "fraction_of_roofline": new / secs / bound}
        for wl, (n, lin, lout) in {"offline_gen": (128, 32, 2048), "offline_long": (32, 4096, 32)}.items():
            if wl in args.workloads:
                n, lin, lout = max(1, n // s), max(8, lin // s), max(8, lout // s)
                secs = run_engine(llm, lambda rep, n=n, lin=lin: prompts_of(n, lin, cfg.vocab_size, seed=300 + rep),
                                  lout, 1)
                out[wl] = {"seconds": secs, "total_tok_s": n * (lin + lout) / secs, "output_tok_s": n * lout / secs}
        if "agreement" in args.workloads:
            toks = greedy_tokens(llm, agree_prompts, args.agree_tokens)
            logits = [prefill_logits(runner, p) for p in agree_prompts[:2]]  # the engine is idle now
            if name == "bf16":
                ref.update(tokens=toks, logits=logits)
            elif ref:
                out["agreement_vs_bf16"] = agreement(ref["tokens"], toks)
                out["logits_vs_bf16"] = logits_vs(ref["logits"], logits)
        llm.shutdown()
        del llm, runner
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a bf16 checkpoint")
    ap.add_argument("--make", metavar="ARCH:PRESET", help="make the bf16 checkpoint (e.g. llama:llama-3.1-8b)")
    ap.add_argument("--fp8-model", default=None, help="an FP8 checkpoint of the same weights (default: quantize "
                                                      "at load)")
    ap.add_argument("--configs", nargs="+", default=["bf16", "fp8", "fp8-kv8"], choices=list(CONFIGS))
    ap.add_argument("--workloads", nargs="+", default=["decode1", "offline_gen", "offline_long", "agreement"])
    ap.add_argument("--agree-tokens", type=int, default=128, help="greedy tokens compared per prompt")
    ap.add_argument("--reps", type=int, default=2, help="decode1 repetitions (the offline workloads run once)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--gemv-sweep", action="store_true", help="time the fp8 GEMV's launch candidates (GPU)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and shapes: check the script on any machine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    from ziggurat.models.config import ModelConfig
    from ziggurat.models.maker import make_model

    cuda = torch.cuda.is_available()
    if args.tiny and not (args.model or args.make):
        args.make = "llama:tiny"
    dtype = "bfloat16"
    if args.make:
        arch, preset = args.make.split(":")
        t0 = time.perf_counter()
        args.model = str(make_model(tempfile.mkdtemp(prefix="bench-fp8-"), arch=arch, preset=preset, dtype=dtype,
                                    max_shard_bytes="5GB", device="cuda" if cuda else "cpu"))
        print(f"made {args.model} in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = ModelConfig.from_dir(args.model)
    s = 64 if args.tiny else 1
    res: dict = {"bench": "fp8", "machine": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
                 "fp8_model": args.fp8_model, "date": time.strftime("%Y-%m-%d"), "configs": {}}
    res["roofline"] = roof = roofline(args.tiny)
    print(f"roofline: {roof['bandwidth_gb_s']:.0f} GB/s copy, bf16 {roof['bf16_matmul_tflop_s']:.0f} / fp8 "
          f"{roof.get('fp8_matmul_tflop_s', 0):.0f} TFLOP/s matmul", flush=True)
    if args.gemv_sweep and cuda:
        res["gemv_sweep"] = gemv_sweep(cfg, args.tiny)
    kw = dict(dtype=dtype, max_model_len=min(cfg.max_position_embeddings, 4096 // s + 2048 // s + 256))
    kw.update(gpu_memory_utilization=args.gpu_memory_utilization) if cuda else kw.update(num_kv_blocks=512)
    ref: dict = {}
    agree_prompts = prompts_of(4 if args.tiny else 16, 64, cfg.vocab_size, seed=7)
    for name in args.configs:
        r = res["configs"][name] = run_config(name, args.model, args.fp8_model, kw, cfg, args, s, roof, ref,
                                              agree_prompts)
        print(name, {k: v for k, v in r.items() if k not in ("model",)}, flush=True)
    base = res["configs"].get("bf16", {})
    rows = []
    for name, r in res["configs"].items():
        ratio = lambda wl, key: (r[wl][key] / base[wl][key]) if wl in r and wl in base else None  # noqa: E731
        rows.append((name, r.get("decode1", {}).get("tok_s"), r.get("decode1", {}).get("fraction_of_roofline"),
                     ratio("decode1", "tok_s"), r.get("offline_gen", {}).get("total_tok_s"),
                     ratio("offline_gen", "total_tok_s"),
                     r.get("offline_long", {}).get("total_tok_s"), ratio("offline_long", "total_tok_s"),
                     r.get("agreement_vs_bf16", {}).get("position_agreement"),
                     r.get("logits_vs_bf16", {}).get("rel_err")))
        r["vs_bf16"] = {"decode1": rows[-1][3], "offline_gen": rows[-1][5], "offline_long": rows[-1][7]}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"\n{'config':<12}{'decode1 tok/s':>14}{'roofline':>9}{'x bf16':>7}{'gen tok/s':>11}{'x bf16':>7}"
          f"{'long tok/s':>11}{'x bf16':>7}{'agree':>7}{'logit err':>10}")
    for name, d, fr, dx, g, gx, lg, lx, ag, le in rows:
        print(f"{name:<12}{fmt(d, '.1f'):>14}{fmt(fr, '.0%'):>9}{fmt(dx, '.2f'):>7}{fmt(g, '.0f'):>11}"
              f"{fmt(gx, '.2f'):>7}{fmt(lg, '.0f'):>11}{fmt(lx, '.2f'):>7}{fmt(ag, '.2f'):>7}{fmt(le, '.3f'):>10}")
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
