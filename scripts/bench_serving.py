"""Online serving benchmark for any OpenAI-compatible endpoint (vLLM / SGLang style).

    python -m ziggurat.scripts.bench_serving --base-url http://127.0.0.1:8000 --model NAME \\
        --endpoint /v1/completions --dataset random --num-prompts 200 --request-rate 8 \\
        --random-input-len 1024 --random-output-len 128 --goodput ttft:500 tpot:50 --json out.json

Datasets (seeded, reproducible):
  random         input/output lengths uniform in [L*(1-r), L*(1+r)] (r = --random-range-ratio;
                 0 gives exactly L) of random token ids.
  shared-prefix  --shared-prefix-groups G groups; request i belongs to group i % G and is the
                 group's random prefix of --shared-prefix-len tokens plus its own random suffix
                 of --shared-suffix-len tokens (exercises prefix caching).
Prompts are sent as token-id lists on /v1/completions (exact lengths, ids in [0, --vocab-size)).
With --tokenizer DIR (containing tokenizer.json) they are decoded to text, re-encoded and
adjusted to the target length, and sent as text. /v1/chat/completions always needs text:
without a tokenizer it gets random common English words (~1 token each, lengths approximate).
Token counts come from the server's usage chunk when there is one (authoritative), else from
the planned prompt length and the number of content chunks.

Requests arrive all at once (--request-rate inf) or as a seeded Poisson process, at most
--max-concurrency in flight. Every request streams (stream_options.include_usage), with
max_tokens = output length, ignore_eos and temperature 0 unless overridden (--extra-body).
Prints a table, writes everything to --json, and always ends with one JSON summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
SLO_KEYS = ("ttft", "tpot", "e2e")
_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
          "which but have an they you were her she there been one all we their has would when if "
          "will two more no out some so said what up its about into than them can only other time "
          "new these may first any my now such like our over man me even most made after also did "
          "many before must through back years where much your way well down should because each "
          "just those people how too little state good very make world still own see men work long "
          "here get both between life being under never day same another know while last might us "
          "great old year off come since against go came right used take three").split()


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str = ""                      # "" = first id listed by GET /v1/models
    api_key: str | None = None
    endpoint: str = "/v1/completions"
    dataset: str = "random"              # random | shared-prefix
    num_prompts: int = 100
    request_rate: float = math.inf       # requests/s; inf = all at once
    max_concurrency: int | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    shared_prefix_groups: int = 8
    shared_prefix_len: int = 512
    shared_suffix_len: int = 128
    seed: int = 0
    temperature: float = 0.0
    goodput: dict[str, float] = field(default_factory=dict)  # {"ttft"|"tpot"|"e2e": ms}
    tokenizer: str | None = None
    vocab_size: int = 1000               # token-id range when there is no tokenizer
    timeout: float = 600.0               # per request, seconds
    warmup_requests: int = 1             # short requests sent first, not measured
    extra_body: dict[str, Any] = field(default_factory=dict)
    save_details: bool = False


@dataclass
class Request:
    prompt: str | list[int]
    prompt_len: int                      # planned (or re-encoded) length
    output_len: int


@dataclass
class RequestResult:
    prompt_len: int = 0
    output_len: int = 0
    success: bool = False
    error: str | None = None
    start: float = 0.0                   # perf_counter when sent
    end: float = 0.0
    ttft: float | None = None            # seconds from start to first content chunk
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of every content chunk
    output_chars: int = 0
    prompt_tokens: int | None = None     # from usage
    completion_tokens: int | None = None
    cached_tokens: int | None = None


# ---------------------------------------------------------------------------------- datasets

def _lengths(rng: np.random.Generator, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=n).tolist()


class _Tok:
    """tokenizers.Tokenizer wrapper: random non-special ids -> text of (nearly) a target length."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.tok = Tokenizer.from_file(file)
        special = set(self.tok.get_added_tokens_decoder())
        n = self.tok.get_vocab_size(with_added_tokens=False)
        self.ids = np.array([i for i in range(n) if i not in special])

    def random_ids(self, rng: np.random.Generator, n: int) -> list[int]:
        return rng.choice(self.ids, size=n).tolist() if n > 0 else []

    def text(self, rng: np.random.Generator, n: int) -> tuple[str, int]:
        ids = self.random_ids(rng, n)
        for _ in range(4):
            text = self.tok.decode(ids, skip_special_tokens=True)
            enc = self.tok.encode(text, add_special_tokens=False).ids
            if len(enc) == n:
                break
            ids = enc[:n] if len(enc) > n else enc + self.random_ids(rng, n - len(enc))
        return text, len(enc)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)


def sample_requests(cfg: BenchConfig, tok: _Tok | None = None) -> list[Request]:
    """The benchmark's requests; deterministic in cfg (seed, lengths, dataset, endpoint)."""
    rng = np.random.default_rng(cfg.seed)
    chat = cfg.endpoint == "/v1/chat/completions"

    def piece(n: int) -> tuple[str | list[int], int]:
        if tok is not None:
            return tok.text(rng, n)
        if chat:
            return " ".join(rng.choice(_WORDS, size=n).tolist()), n
        return rng.integers(0, cfg.vocab_size, size=n).tolist(), n

    def join(a, b):
        if tok is not None:
            return a + b, tok.count(a + b)
        return (a + b if isinstance(a, list) else f"{a} {b}"), None

    n = cfg.num_prompts
    if cfg.dataset == "random":
        ins = _lengths(rng, n, cfg.random_input_len, cfg.random_range_ratio)
        outs = _lengths(rng, n, cfg.random_output_len, cfg.random_range_ratio)
        return [Request(*piece(i), o) for i, o in zip(ins, outs)]
    if cfg.dataset == "shared-prefix":
        prefixes = [piece(cfg.shared_prefix_len)[0] for _ in range(cfg.shared_prefix_groups)]
        outs = _lengths(rng, n, cfg.random_output_len, cfg.random_range_ratio)
        reqs = []
        for i in range(n):
            prompt, plen = join(prefixes[i % cfg.shared_prefix_groups], piece(cfg.shared_suffix_len)[0])
            reqs.append(Request(prompt, plen or cfg.shared_prefix_len + cfg.shared_suffix_len, outs[i]))
        return reqs
    raise ValueError(f"unknown dataset {cfg.dataset!r}")


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Scheduled send times (s after start): 0 for rate=inf, else a seeded Poisson process."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("request rate must be > 0 (or inf)")
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()[:n]


# ------------------------------------------------------------------------------------ client

def _payload(cfg: BenchConfig, model: str, req: Request) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": cfg.temperature,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return {**body, **cfg.extra_body}


def _content(choice: dict) -> str:
    if choice.get("text"):
        return choice["text"]
    delta = choice.get("delta") or {}
    tools = json.dumps(delta["tool_calls"]) if delta.get("tool_calls") else ""
    return delta.get("content") or delta.get("reasoning_content") or tools


def _on_chunk(res: RequestResult, obj: dict, now: float) -> None:
    text = "".join(_content(c) for c in obj.get("choices") or [])
    if text:
        if res.ttft is None:
            res.ttft = now - res.start
        res.chunk_times.append(now)
        res.output_chars += len(text)
    if usage := obj.get("usage"):
        res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
        res.completion_tokens = usage.get("completion_tokens", res.completion_tokens)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        res.cached_tokens = cached if cached is not None else res.cached_tokens


async def send_request(session: aiohttp.ClientSession, url: str, headers: dict, body: dict,
                       res: RequestResult) -> RequestResult:
    """POST one streaming request, parsing SSE; fills and returns res (never raises)."""
    res.start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            else:
                await _read_sse(resp, res)
        if res.error is None and body.get("max_tokens", 1) > 0 and res.ttft is None:
            res.error = "no output tokens received"
    except Exception as e:  # connection errors, timeouts, bad JSON
        res.error = f"{type(e).__name__}: {e}"[:300]
    res.end = time.perf_counter()
    res.success = res.error is None
    return res


async def _read_sse(resp: aiohttp.ClientResponse, res: RequestResult) -> None:
    """Consume an SSE body: `data: {json}` chunks, `data: [DONE]`; an error event sets res.error."""
    buf, event = b"", None
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        buf += data
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.strip()
            if not line:
                event = None
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode()
            elif line.startswith(b"data:") and (payload := line[5:].strip()) != b"[DONE]":
                obj = json.loads(payload)
                if event == "error" or (isinstance(obj, dict) and obj.get("error")):
                    err = obj.get("error", obj) if isinstance(obj, dict) else obj
                    res.error = f"SSE error: {json.dumps(err)[:300]}"
                    return
                _on_chunk(res, obj, now)


async def _first_model(session: aiohttp.ClientSession, base_url: str, headers: dict) -> str:
    async with session.get(base_url + "/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def run_benchmark(cfg: BenchConfig) -> dict:
    """Run the benchmark described by cfg against cfg.base_url; returns the metrics dict."""
    if cfg.endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}")
    if bad := set(cfg.goodput) - set(SLO_KEYS):
        raise ValueError(f"unknown goodput SLO {sorted(bad)}; use {SLO_KEYS}")
    tok = _Tok(cfg.tokenizer) if cfg.tokenizer else None
    requests = sample_requests(cfg, tok)
    offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.seed)
    base = cfg.base_url.rstrip("/")
    url = base + cfg.endpoint
    key = cfg.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = cfg.model or await _first_model(session, base, headers)
        wrng = np.random.default_rng([cfg.seed, 2])
        for _ in range(cfg.warmup_requests):
            prompt = (" ".join(wrng.choice(_WORDS, 16).tolist()) if tok or cfg.endpoint != ENDPOINTS[0]
                      else wrng.integers(0, cfg.vocab_size, 16).tolist())
            w = await send_request(session, url, headers, _payload(cfg, model, Request(prompt, 16, 4)),
                                   RequestResult())
            if not w.success:
                print(f"warning: warm-up request failed: {w.error}", file=sys.stderr)
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        t0 = time.perf_counter()

        async def one(i: int, req: Request) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
            res = RequestResult(prompt_len=req.prompt_len, output_len=req.output_len)
            if sem is None:
                return await send_request(session, url, headers, _payload(cfg, model, req), res)
            async with sem:
                return await send_request(session, url, headers, _payload(cfg, model, req), res)

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    duration = max((r.end for r in results), default=t0) - t0
    out = compute_metrics(cfg, results, duration, t0, offsets)
    out["model"] = model
    return out


# ----------------------------------------------------------------------------------- metrics

def _stats(name: str, xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "p90", "p99")}
    return {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
            f"p90_{name}_ms": float(np.percentile(a, 90)), f"p99_{name}_ms": float(np.percentile(a, 99))}


def compute_metrics(cfg: BenchConfig, results: list[RequestResult], duration: float,
                    t0: float = 0.0, offsets: list[float] | None = None) -> dict:
    ok = [r for r in results if r.success]
    n_in = [r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok]
    n_out = [r.completion_tokens if r.completion_tokens is not None else len(r.chunk_times) for r in ok]
    ttft = [r.ttft * 1e3 for r in ok]
    e2e = [(r.end - r.start) * 1e3 for r in ok]
    tpot = [(e - t) / (o - 1) for e, t, o in zip(e2e, ttft, n_out) if o > 1]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    good = 0
    for e, t, o in zip(e2e, ttft, n_out):
        per = {"ttft": t, "tpot": (e - t) / (o - 1) if o > 1 else 0.0, "e2e": e}
        good += all(per[k] <= v for k, v in cfg.goodput.items())
    dur = max(duration, 1e-9)
    reported = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    cached = sum(reported) if reported else None
    errors = collections.Counter(r.error for r in results if not r.success)
    conf = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
            for k, v in dataclasses.asdict(cfg).items() if k != "api_key"}
    out: dict[str, Any] = {
        "config": conf, "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": dict(errors.most_common(10)),
        "total_input_tokens": sum(n_in), "total_output_tokens": sum(n_out),
        "request_throughput": len(ok) / dur, "input_throughput": sum(n_in) / dur,
        "output_throughput": sum(n_out) / dur, "total_token_throughput": (sum(n_in) + sum(n_out)) / dur,
        "good_requests": good if cfg.goodput else None,
        "request_goodput": good / dur if cfg.goodput else None,
        "total_cached_tokens": cached,
        "cache_hit_rate": cached / max(sum(n_in), 1) if cached is not None else None,
        **_stats("ttft", ttft), **_stats("tpot", tpot), **_stats("itl", itl), **_stats("e2e", e2e),
    }
    if cfg.save_details:
        offsets = offsets or [0.0] * len(results)
        out["details"] = [{
            "success": r.success, "error": r.error, "prompt_len": r.prompt_len, "output_len": r.output_len,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens, "scheduled_s": offsets[i], "start_s": r.start - t0,
            "ttft_ms": r.ttft * 1e3 if r.ttft is not None else None, "e2e_ms": (r.end - r.start) * 1e3,
            "itl_ms": [(b - a) * 1e3 for a, b in zip(r.chunk_times, r.chunk_times[1:])],
            "output_chars": r.output_chars,
        } for i, r in enumerate(results)]
    return out


def format_table(m: dict) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)
    rows = [("Successful requests", m["completed"], "{}"), ("Failed requests", m["failed"], "{}"),
            ("Benchmark duration (s)", m["duration"], None),
            ("Total input tokens", m["total_input_tokens"], "{}"),
            ("Total generated tokens", m["total_output_tokens"], "{}"),
            ("Request throughput (req/s)", m["request_throughput"], None),
            ("Request goodput (req/s)", m["request_goodput"], None),
            ("Input token throughput (tok/s)", m["input_throughput"], None),
            ("Output token throughput (tok/s)", m["output_throughput"], None),
            ("Total token throughput (tok/s)", m["total_token_throughput"], None),
            ("Cached prompt tokens", m["total_cached_tokens"], "{}"),
            ("Cache hit rate", m["cache_hit_rate"], "{:.2%}")]
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{k + ':':<44}{f(v, fmt or '{:.2f}'):>16}" for k, v, fmt in rows]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                       ("itl", "Inter-token Latency (between chunks)"), ("e2e", "End-to-end Latency")):
        lines.append("{:-^60}".format(f" {title} "))
        for s in ("mean", "median", "p90", "p99"):
            label = f"{s.capitalize()} {key.upper()} (ms):"
            lines.append(f"{label:<44}{f(m[s + '_' + key + '_ms']):>16}")
    for msg, count in m["errors"].items():
        lines.append(f"error x{count}: {msg}")
    lines.append("=" * 60)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=d.base_url)
    p.add_argument("--model", default=d.model, help="default: first model of GET /v1/models")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY if set")
    p.add_argument("--endpoint", default=d.endpoint, choices=ENDPOINTS)
    p.add_argument("--dataset", default=d.dataset, choices=("random", "shared-prefix"))
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--request-rate", type=float, default=d.request_rate, help="req/s, inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=d.random_input_len)
    p.add_argument("--random-output-len", type=int, default=d.random_output_len)
    p.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio)
    p.add_argument("--shared-prefix-groups", type=int, default=d.shared_prefix_groups)
    p.add_argument("--shared-prefix-len", type=int, default=d.shared_prefix_len)
    p.add_argument("--shared-suffix-len", type=int, default=d.shared_suffix_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50 e2e:10000")
    p.add_argument("--tokenizer", default=None, help="HF dir with tokenizer.json (prompts sent as text)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="token-id range without --tokenizer")
    p.add_argument("--timeout", type=float, default=d.timeout, help="per-request timeout (s)")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--save-details", action="store_true", help="include per-request records in the JSON")
    a = p.parse_args(argv)
    try:
        slo = {k: float(v) for k, v in (s.split(":", 1) for s in a.goodput)}
    except ValueError:
        p.error("--goodput takes KEY:MS pairs, e.g. ttft:500 tpot:50")
    if bad := set(slo) - set(SLO_KEYS):
        p.error(f"unknown --goodput key(s) {sorted(bad)}; use {SLO_KEYS}")
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in vars(a).items() if k in names and k != "goodput"}, goodput=slo)
    return cfg, a


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    result = asyncio.run(run_benchmark(cfg))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "details"}))
    return result


if __name__ == "__main__":
    main()
