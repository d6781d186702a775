"""Multi-LoRA throughput: the base model alone vs 0, 1, 8 and 32 distinct adapters in one batch,
and the inter-token latency of running streams while a cold adapter is loaded.

    python -m ziggurat.scripts.bench_lora [--model DIR] [--json out.json]     # GPU: Llama-3.1-8B-shaped bf16
    python -m ziggurat.scripts.bench_lora --tiny                               # CPU: a tiny model, end to end

Without --model it makes the model (`python -m ziggurat.models.maker DIR --arch llama --preset
llama-3.1-8b --dtype bfloat16 --device cuda`) and writes random rank-16 adapters in PEFT's format
(models/lora_maker.py). Workload: 128 requests x 512 random prompt tokens / 128 output tokens
(ignore_eos), all submitted at once; request i uses adapter i mod k. Everything runs in one
process and one call:

  base        an engine without LoRA (enable_lora off): the reference
  lora k      an engine with max_loras slots serving the same batch over k adapters (k = 0: the
              base model through the LoRA engine); each adapter is warm (in a slot) beforehand
  load        streams decoding on the LoRA engine; then one request on a base prompt is
              admitted (its prefill alone), then one on an adapter never seen (read from disk,
              copied to a slot, then its prefill): the steps' times against the median step

Figures: output tok/s over the whole batch, decode tok/s after every request has its first
token (and the mean decode step), and ratio = lora k output tok/s / base output tok/s
(issue 15's target: >= 0.85 at k = 8). Prints one JSON line (scripts/report.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from ziggurat.scripts.report import emit


def run_batch(engine, prompts, out_len: int, loras) -> dict:
    """Submit everything at once, step to the end: output and decode throughput."""
    from ziggurat import SamplingParams

    base = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    ids = [engine.add_request(p, base.clone(lora_request=lr) if lr is not None else base) for p, lr in
           zip(prompts, loras)]
    first: dict[str, float] = {}
    steps: list[tuple[float, float, int]] = []  # (start, end, tokens)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        s = time.perf_counter()
        ups = engine.step()
        e = time.perf_counter()
        steps.append((s, e, len(ups.token_ids)))
        for rid in ups.request_ids:
            first.setdefault(rid, e)
    wall = time.perf_counter() - t0
    assert len(first) == len(ids), "every request produced tokens"
    total = sum(n for *_, n in steps)
    all_first = max(first.values())
    after = [(s, e, n) for s, e, n in steps if s >= all_first]
    dec_secs = sum(e - s for s, e, _ in after)
    return dict(output_tokens=total, seconds=wall, output_tok_s=total / wall,
                decode_tok_s=sum(n for *_, n in after) / dec_secs if dec_secs else None,
                decode_step_ms=1e3 * dec_secs / len(after) if after else None, ttft_last_s=all_first - t0)


def load_stall(engine, vocab: int, warm_lora, cold_lora, streams: int, input_len: int, rng) -> dict:
    """Step times while streams decode, when a base prompt is admitted and when a cold adapter's is."""
    from ziggurat import SamplingParams

    long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    live = [engine.add_request([rng.randrange(vocab) for _ in range(64)],
                               long.clone(lora_request=warm_lora) if i % 2 else long) for i in range(streams)]

    def steps(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            engine.step()
            out.append(time.perf_counter() - t)
        return out

    steps(8)  # every stream decoding
    baseline = steps(12)
    one = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request([rng.randrange(vocab) for _ in range(input_len)], one)
    with_prefill = steps(4)
    reads = _disk_reads(engine)
    engine.add_request([rng.randrange(vocab) for _ in range(input_len)], one.clone(lora_request=cold_lora))
    with_load = steps(4)
    loaded = _disk_reads(engine) - reads if reads is not None else None
    engine.abort(live)
    while engine.has_unfinished():
        engine.step()
    med = statistics.median(baseline)
    return dict(streams=streams, median_step_ms=1e3 * med, base_prefill_step_ms=1e3 * max(with_prefill),
                cold_adapter_step_ms=1e3 * max(with_load), adapter_disk_reads=loaded,
                stall_steps=(max(with_load) - max(with_prefill)) / med,
                itl_ms_around_load=[round(1e3 * x, 3) for x in with_load])


def _disk_reads(engine):
    w = getattr(engine.executor, "worker", None)  # in-process executor: rank 0's runner
    return w.runner.loras.disk_reads if w is not None and w.runner.loras is not None else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an HF model directory (default: make the Llama-3.1-8B-shaped one)")
    ap.add_argument("--tiny", action="store_true", help="CPU: a tiny llama, small workload")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--adapters", default=None, help="distinct adapter counts, comma-separated (default 0,1,8,32)")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--stream-requests", type=int, default=None, help="streams decoding during the adapter load")
    ap.add_argument("--no-base", action="store_true", help="skip the engine without LoRA")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch

    from ziggurat import LoRARequest
    from ziggurat.actors.scheduler.engine import EngineCore
    from ziggurat.config import EngineConfig
    from ziggurat.models.config import ModelConfig
    from ziggurat.models.lora_maker import make_adapter
    from ziggurat.models.maker import make_model

    small = a.tiny
    n = a.num_requests or (16 if small else 128)
    in_len, out_len = a.input_len or (48 if small else 512), a.output_len or (12 if small else 128)
    counts = [int(x) for x in (a.adapters or ("0,1,4" if small else "0,1,8,32")).split(",")]
    rank = a.rank or (8 if small else 16)
    streams = a.stream_requests or (4 if small else 64)
    dev = "cpu" if small or not torch.cuda.is_available() else "cuda"
    dtype = a.dtype or ("float32" if dev == "cpu" else "bfloat16")
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    t = time.perf_counter()
    model = a.model or str(make_model(work / "model", arch="llama", preset="tiny" if small else "llama-3.1-8b",
                                      dtype=dtype, device=dev, max_shard_bytes="5GB"))
    make_s = time.perf_counter() - t
    adapters = [LoRARequest(f"a{i}", i + 1, str(make_adapter(model, work / f"a{i}", rank=rank, seed=i,
                                                             dtype=getattr(torch, dtype))))
                for i in range(max(counts) + 1)]  # one more: the cold one of the load test
    vocab = min(ModelConfig.from_dir(model).vocab_size, 10000)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(in_len)] for _ in range(n)]
    kw = dict(model=model, dtype=dtype, tensor_parallel_size=a.tp, device=dev, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=16384, gpu_memory_utilization=a.gpu_memory_utilization,
              max_model_len=max(2048, in_len + out_len + 16))
    if dev == "cpu":
        kw["num_kv_blocks"] = 4 * n * (in_len + out_len) // 16 + 64
    out = {"bench": "lora", "machine": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "model": model,
           "num_requests": n, "input_len": in_len, "output_len": out_len, "rank": rank, "tp": a.tp, "dtype": dtype,
           "date": time.strftime("%Y-%m-%d"), "make_s": round(make_s, 1)}

    if not a.no_base:
        eng = EngineCore(EngineConfig(**kw))
        run_batch(eng, prompts[:4], 4, [None] * 4)  # warm-up
        out["base"] = run_batch(eng, prompts, out_len, [None] * n)
        eng.shutdown()
        del eng
        if dev == "cuda":
            torch.cuda.empty_cache()

    max_loras = max(max(counts), 1)
    eng = EngineCore(EngineConfig(**kw, enable_lora=True, max_loras=max_loras, max_lora_rank=rank,
                                  max_cpu_loras=max_loras + 2))
    warm = adapters[:max_loras]
    run_batch(eng, prompts[: len(warm)], 2, warm)  # every adapter read and in a slot; kernels compiled
    out["lora"] = {}
    for k in counts:
        loras = [adapters[i % k] if k else None for i in range(n)]
        r = out["lora"][str(k)] = run_batch(eng, prompts, out_len, loras)
        if "base" in out:
            r["ratio_to_base"] = r["output_tok_s"] / out["base"]["output_tok_s"]
            r["decode_ratio_to_base"] = (r["decode_tok_s"] / out["base"]["decode_tok_s"]
                                         if r["decode_tok_s"] and out["base"]["decode_tok_s"] else None)
    out["load"] = load_stall(eng, vocab, adapters[0], adapters[max(counts)], streams, in_len, rng)
    eng.shutdown()

    print(f"{'run':>10} {'out tok/s':>10} {'decode tok/s':>13} {'step ms':>8} {'x base':>7}")
    rows = ([("base", out["base"])] if "base" in out else []) + [(f"lora {k}", v) for k, v in out["lora"].items()]
    for name, r in rows:
        print(f"{name:>10} {r['output_tok_s']:10.1f} {r['decode_tok_s'] or 0:13.1f} {r['decode_step_ms'] or 0:8.2f} "
              f"{r.get('ratio_to_base', 1.0):7.3f}")
    ld = out["load"]
    print(f"load: median step {ld['median_step_ms']:.2f} ms, with a base prefill {ld['base_prefill_step_ms']:.2f} ms, "
          f"with a cold adapter {ld['cold_adapter_step_ms']:.2f} ms ({ld['stall_steps']:+.2f} steps)")
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
