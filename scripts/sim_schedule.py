"""Scheduling policies in simulated time: the real engine (EngineCore: scheduler, KV manager, block
pool, async scheduling) with no model, each step occupying a simulated device for the time a GPU
takes for its tokens, by a step-time model fitted to `nvidia-h200` measurements (below). Seconds of
CPU for what takes minutes of GPU: the policy's own effect on inter-token latency and throughput,
with no delivery path (HTTP, SSE, client) in between.

    python -m ziggurat.scripts.sim_schedule [--policies fcfs decode_first:2048 decode_first@60] \
        [--num-prompts 256 --input-len 1024 --output-len 128 --rate inf] [--json out.json]

Policies: fcfs | decode_first[:MAX_PREFILL_TOKENS] | decode_first@TARGET_STEP_MS (the prompt share
sized by the engine's own step-time fit to keep a step near TARGET ms; config.py::target_step_ms).

The step-time model (StepTimeModel, Llama-3.1-8B shape, bf16, one H200; each term from a figure
in BENCHMARKS.md):
    base_s          4.7 ms   a decode step at batch 1 (212.5 tok/s): the weights' read + launches
    prefill_token_s  27 us   a prompt token in a large chunk (4,096 tokens in 114.7 ms)
    context_token_s  32 ns   a token of context a decode row attends (131 KB of KV at 4.1 TB/s)
    decode_row_s      9 us   a decode row's own cost (batch 128, ~576 tokens of context: 8.25 ms)
    host_s          1.0 ms   the host's schedule + update per step (overlaps the device under
                             async scheduling)
Checked against the one burst measured end to end (256 x 1024/128 on the H200, BENCHMARKS.md
"Inter-token latency under load"): the simulator's fcfs throughput and the ratios of the
decode_first runs are printed next to the measured ones by --check.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import asdict, dataclass

import numpy as np

from ziggurat.scripts.bench_serving_sweep import policy_settings
from ziggurat.scripts.report import emit

# The end-to-end measurement the model is checked against (nvidia-h200, 2026-12-01, 256 x 1024/128):
# policy -> (output tok/s, ITL p99 ms, client-side).
MEASURED_H200 = {"fcfs": (3185, 282.7), "decode_first:2048": (2678, 210.7), "decode_first:1024": (2283, 108.6)}


@dataclass
class StepTimeModel:
    base_s: float = 4.7e-3
    prefill_token_s: float = 27e-6
    context_token_s: float = 32e-9
    decode_row_s: float = 9e-6
    host_s: float = 1.0e-3

    def seconds(self, prompt_tokens: int, decode_rows: int, decode_context: int) -> float:
        return (self.base_s + self.prefill_token_s * prompt_tokens + self.decode_row_s * decode_rows
                + self.context_token_s * decode_context)


class Clock:
    def __init__(self):
        self.now = 0.0


def sim_executor(clock: Clock, model: StepTimeModel):
    """An executor factory: NullWorker's token bookkeeping, time from `model` on `clock`."""
    from ziggurat.models.null_worker import NullWorker

    class SimExecutor(NullWorker):
        overlaps = True

        def __init__(self, config, max_model_len):
            super().__init__(config)
            self.free_at = 0.0
            self.steps: list[tuple[float, float, int, int]] = []  # (start, end, prompt tokens, decode rows)

        def execute_async(self, step):
            clock.now += model.host_s  # the host scheduled this step
            if step.is_empty:
                return self.execute(step), clock.now
            out = self.execute(step)  # (advances each row's computed count by its tokens)
            rows, n = step.rows, step.num_tokens
            ctx = self.computed[rows]
            dec = n == 1
            secs = model.seconds(int(n[~dec].sum()), int(dec.sum()), int(ctx[dec].sum()))
            start = max(clock.now, self.free_at)
            self.free_at = start + secs
            self.steps.append((start, self.free_at, int(n[~dec].sum()), int(dec.sum())))
            return out, self.free_at

        def wait(self, handle):
            out, ready = handle
            clock.now = max(clock.now, ready)
            return out

        def shutdown(self):
            pass

    return SimExecutor


def run(policy: str, args, model: StepTimeModel) -> dict:
    from ziggurat import SamplingParams
    from ziggurat.actors.scheduler.engine import EngineCore
    from ziggurat.cluster.spec import tiny_model_dir
    from ziggurat.config import EngineConfig

    clock = Clock()
    cfg = EngineConfig(model=str(tiny_model_dir()), device="cpu", num_kv_blocks=args.num_kv_blocks,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.input_len + args.output_len + 16, **policy_settings(policy))
    factory = sim_executor(clock, model)
    made = []
    eng = EngineCore(cfg, executor_factory=lambda c, n: made.append(factory(c, n)) or made[-1])
    eng.clock = lambda: clock.now  # the engine times its steps (target_step_ms's fit) on the simulated clock
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1 / args.rate, args.num_prompts) if math.isfinite(args.rate) else np.zeros(args.num_prompts)
    arrivals = np.cumsum(gaps) - gaps[0]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    times: dict[str, list[float]] = {}
    arrival_of: dict[str, float] = {}
    nxt, engine_steps = 0, 0
    while nxt < args.num_prompts or eng.has_unfinished():
        if not eng.has_unfinished() and nxt < args.num_prompts:
            clock.now = max(clock.now, arrivals[nxt])
        while nxt < args.num_prompts and arrivals[nxt] <= clock.now:
            prompt = rng.integers(1, 1000, args.input_len).tolist()
            rid = eng.add_request(prompt, params, request_id=f"r{nxt}")
            arrival_of[rid], times[rid] = float(arrivals[nxt]), []
            nxt += 1
        updates = eng.step()
        engine_steps += 1
        for rid, tok in zip(updates.request_ids, updates.token_ids):
            if tok >= 0:
                times[rid].append(clock.now)
    ex = made[0]
    ttft = [1e3 * (t[0] - arrival_of[r]) for r, t in times.items()]
    itl = [1e3 * (b - a) for t in times.values() for a, b in zip(t, t[1:])]
    tpot = [1e3 * (t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    span = max(t[-1] for t in times.values()) - float(arrivals[0])
    out_tokens = sum(len(t) for t in times.values())
    steps = np.array([(b - a) * 1e3 for a, b, *_ in ex.steps])
    pct = lambda xs, q: float(np.percentile(xs, q)) if len(xs) else float("nan")  # noqa: E731
    return {"policy": policy, "output_tok_s": out_tokens / span, "seconds": span, "steps": len(ex.steps), "engine_steps": engine_steps,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "tpot_p50_ms": pct(tpot, 50),
            "itl_p50_ms": pct(itl, 50), "itl_p90_ms": pct(itl, 90), "itl_p99_ms": pct(itl, 99),
            "itl_max_ms": max(itl) if itl else float("nan"), "step_p50_ms": pct(steps, 50),
            "step_p99_ms": pct(steps, 99), "prompt_tokens_per_step_max": max(p for *_, p, _ in ex.steps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["fcfs", "decode_first:2048", "decode_first:1024"])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rate", type=float, default=math.inf, help="req/s (Poisson); inf: all at once")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--num-kv-blocks", type=int, default=50_000, help="an H200's KV cache for the 8B (~100 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="print the H200's measured figures next to the simulated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model = StepTimeModel()
    rows = [run(p, args, model) for p in args.policies]
    base = rows[0]["output_tok_s"]
    print(f"{'policy':22s} {'out tok/s':>9s} {'x first':>7s} {'steps':>5s} {'TTFT p50':>8s} {'ITL p50':>7s} "
          f"{'p90':>6s} {'p99':>6s} {'max':>6s} {'step p99':>8s}" + ("  measured tok/s (x) / ITL p99" if args.check else ""))
    for r in rows:
        line = (f"{r['policy']:22s} {r['output_tok_s']:9.0f} {r['output_tok_s'] / base:7.2f} {r['steps']:5d} "
                f"{r['ttft_p50_ms']:8.0f} {r['itl_p50_ms']:7.1f} {r['itl_p90_ms']:6.1f} {r['itl_p99_ms']:6.1f} "
                f"{r['itl_max_ms']:6.1f} {r['step_p99_ms']:8.1f}")
        if args.check and r["policy"] in MEASURED_H200:
            tok, p99 = MEASURED_H200[r["policy"]]
            line += f"  {tok} ({tok / MEASURED_H200['fcfs'][0]:.2f}) / {p99}"
        print(line)
    emit({"bench": "sim_schedule", "machine": "simulated nvidia-h200 (StepTimeModel)", "model": asdict(model),
          "workload": {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "rate", "seed")},
          "runs": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
