"""Structured outputs: output throughput with a JSON-schema grammar against without, same run.

    python -m ziggurat.scripts.bench_structured --model /tmp/llama8b --dtype bfloat16 [--json out.json]

64 requests in flight (random 256-token prompts), each generating exactly
--output-len tokens (ignore_eos: once the JSON is complete the grammar allows
only the end-of-sequence token, which keeps being masked and sampled, so both
modes do the same number of steps over the same batch). The grammar is a
~20-field object schema (strings with maxLength, bounded integers, booleans,
enums, an array, a nested object). Runs alternate plain / grammar, --repeat
times each; medians reported, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from ziggurat.scripts.report import emit

SCHEMA = {
    "type": "object",
    "properties": {
        **{f"name_{i}": {"type": "string", "maxLength": 16} for i in range(5)},
        **{f"count_{i}": {"type": "integer", "minimum": 0, "maximum": 100000} for i in range(4)},
        **{f"score_{i}": {"type": "integer", "minimum": -1000, "maximum": 1000} for i in range(3)},
        **{f"flag_{i}": {"type": "boolean"} for i in range(3)},
        "color": {"enum": ["red", "green", "blue", "black", "white"]},
        "size": {"enum": ["S", "M", "L", "XL"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999}, "email": {"type": "string",
                                                                                       "maxLength": 24}},
                  "required": ["id", "email"], "additionalProperties": False},
        "note": {"type": "string", "maxLength": 40},
    },
    "additionalProperties": False,
}
SCHEMA["required"] = list(SCHEMA["properties"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from ziggurat import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(args.model, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization)
    vocab = min(llm.engine.model_config.vocab_size, 10000)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.input_len)]}
               for _ in range(args.num_requests)]
    base = dict(temperature=0.7, max_tokens=args.output_len, ignore_eos=True)
    modes = {"plain": SamplingParams(**base),
             "json_schema": SamplingParams(**base, structured_outputs=StructuredOutputsParams(json=SCHEMA))}
    t = time.perf_counter()
    llm.generate(prompts[:2], modes["json_schema"], use_tqdm=False)  # compile the grammar, warm everything
    llm.generate(prompts[:2], modes["plain"], use_tqdm=False)
    print(f"warm-up (incl. grammar compile) {time.perf_counter() - t:.2f} s")
    runs = {m: [] for m in modes}
    valid = None
    for r in range(args.repeat):
        for mode, params in modes.items():
            before = dict(llm.engine.seconds)
            t = time.perf_counter()
            outs = llm.generate(prompts, [params.clone(seed=1000 * r + i) for i in range(len(prompts))],
                                use_tqdm=False)
            dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            runs[mode].append(n / dt)
            parts = ", ".join(f"{k} {llm.engine.seconds[k] - before[k]:.2f}" for k in before)
            print(f"run {r} {mode:12s} {n} tokens in {dt:.2f} s = {n / dt:,.0f} output tok/s  (engine s: {parts})")
            if mode == "json_schema":
                ok = 0
                for o in outs:
                    try:
                        json.loads(o.outputs[0].text, strict=False)  # xgrammar lets raw control chars into strings
                        ok += 1
                    except json.JSONDecodeError:
                        pass
                valid = ok
    med = {m: statistics.median(v) for m, v in runs.items()}
    ratio = med["json_schema"] / med["plain"]
    print(f"median output tok/s: plain {med['plain']:,.0f}, json_schema {med['json_schema']:,.0f}; "
          f"ratio {ratio:.3f} (target >= 0.9); {valid}/{len(prompts)} outputs of the last grammar run parse as JSON")
    emit({"bench": "structured", "model": args.model, "requests": args.num_requests, "input_len": args.input_len,
          "output_len": args.output_len, "runs": runs, "median": med, "ratio": ratio, "valid_json": valid},
         args.json)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
