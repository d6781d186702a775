"""Offline throughput on the nano-vllm workload, optionally next to HF transformers.

    python -m ziggurat.scripts.bench_offline --model DIR [--hf] [--json out.json]
    python -m ziggurat.scripts.bench_offline --make qwen3:qwen3-0.6b --dtype bfloat16 --hf

Workload (nano-vllm's bench.py): 256 sequences, prompt lengths and max_tokens
each uniform in [100, 1024], random token ids, seed 0, ignore_eos, so every
request generates exactly its max_tokens. Prints a table and one JSON line.

The HF peer runs `generate` on the same requests in left-padded batches of
--hf-batch (static batching: a batch decodes until its longest request is
done); its throughput counts only each request's own tokens.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time

from ziggurat.scripts.report import emit


def workload(num_seqs: int, lo: int, max_in: int, max_out: int, seed: int, vocab: int):
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(num_seqs):
        prompts.append([rng.randint(0, min(vocab, 10000) - 1) for _ in range(rng.randint(lo, max_in))])
        outs.append(rng.randint(lo, max_out))
    return prompts, outs


def run_ziggurat(args, prompts, out_lens) -> dict:
    from ziggurat import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        tensor_parallel_size=args.tp,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        **({"num_kv_blocks": args.num_kv_blocks} if args.num_kv_blocks else {}),
    )
    startup = time.perf_counter() - t0
    params = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=n) for n in out_lens]
    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True)] * 2)  # warm-up
    runs = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        _sync()
        runs.append(time.perf_counter() - t)
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    assert gen == sum(out_lens), (gen, sum(out_lens))
    secs = statistics.median(runs)
    res = dict(
        engine="ziggurat",
        seconds=secs,
        runs=runs,
        output_tokens=gen,
        output_tok_s=gen / secs,
        total_tok_s=(gen + sum(map(len, prompts))) / secs,
        startup_s=startup,
        num_kv_blocks=llm.engine.num_blocks,
        preemptions=llm.engine.scheduler.num_preemptions,
    )
    llm.shutdown()
    return res


def run_hf(args, prompts, out_lens) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev).eval()
    model.generation_config.eos_token_id = None  # ignore_eos
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # help HF: similar lengths together
    t = time.perf_counter()
    useful = 0
    for s in range(0, len(order), args.hf_batch):
        idx = order[s : s + args.hf_batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            model.generate(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max(out_lens[i] for i in idx),
                do_sample=args.temperature > 0, temperature=args.temperature or None, top_k=None, top_p=None,
                pad_token_id=0,
            )
        useful += sum(out_lens[i] for i in idx)
    _sync()
    secs = time.perf_counter() - t
    return dict(engine="hf-transformers", seconds=secs, output_tokens=useful, output_tok_s=useful / secs,
                total_tok_s=(useful + sum(map(len, prompts))) / secs, batch=args.hf_batch)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF-format model directory")
    ap.add_argument("--make", metavar="ARCH:PRESET", help="make a random-weight model first, e.g. qwen3:qwen3-0.6b")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of the whole workload (median reported)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--hf", action="store_true", help="also time HF transformers generate on the same requests")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--json", help="write results here too")
    args = ap.parse_args(argv)
    if args.make:
        from ziggurat.models.maker import make_model

        arch, preset = args.make.split(":")
        args.model = str(make_model(tempfile.mkdtemp(prefix="bench-model-"), arch=arch, preset=preset,
                                    dtype=args.dtype or "bfloat16", device="cuda" if _has_cuda() else "cpu"))
    if not args.model:
        ap.error("--model or --make is required")
    from ziggurat.models.config import ModelConfig

    vocab = ModelConfig.from_dir(args.model).vocab_size
    prompts, out_lens = workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len, args.seed, vocab)
    results = [run_ziggurat(args, prompts, out_lens)]
    r = results[0]
    print(f"ziggurat: {r['seconds']:.2f} s, {r['output_tok_s']:.1f} output tok/s, {r['total_tok_s']:.1f} total tok/s",
          flush=True)
    if args.hf:
        results.append(run_hf(args, prompts, out_lens))
    summary = dict(
        bench="offline-nano-vllm", machine=machine(), model=args.model, dtype=args.dtype, tp=args.tp,
        num_seqs=args.num_seqs, prompt_tokens=sum(map(len, prompts)), output_tokens=sum(out_lens),
        date=time.strftime("%Y-%m-%d"), results=results,
    )
    if len(results) == 2:
        summary["speedup_vs_hf"] = results[0]["output_tok_s"] / results[1]["output_tok_s"]
    print(f"\n{'engine':<18}{'seconds':>10}{'output tok/s':>15}{'total tok/s':>14}")
    for r in results:
        print(f"{r['engine']:<18}{r['seconds']:>10.2f}{r['output_tok_s']:>15.1f}{r['total_tok_s']:>14.1f}")
    if "speedup_vs_hf" in summary:
        print(f"ziggurat / HF output throughput: {summary['speedup_vs_hf']:.2f}x")
    emit(summary, args.json)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
