"""The serving benchmark (ziggurat.scripts.bench_serving) against a fake streaming OpenAI server.

The fake server runs in-process (starlette on uvicorn, 127.0.0.1, free port, background thread)
and streams exactly max_tokens tokens: an optional role-only chunk at once, the first content
chunk after FIRST s, then one chunk of `per_chunk` tokens every ITL s, an empty finish chunk, a
usage chunk (prompt, completion and cached tokens: prefix caching over 16-token blocks of
token-id prompts) and [DONE]. Knobs make every k-th request (in server arrival order) slow,
answered 429, or broken by an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ziggurat.scripts import bench_serving as bs

FIRST, ITL, SLOW_FIRST, BLOCK = 0.04, 0.004, 0.4, 16
DEFAULTS = dict(per_chunk=1, slow_every=0, fail_every=0, sse_error_every=0)
STATE: dict = {}


def _reset(**kw):
    STATE.clear()
    STATE.update(DEFAULTS, n=0, seen=set(), bodies=[], **kw)


def _hit(k: int, every: int) -> bool:
    return every > 0 and k % every == every - 1


async def _completions(request):
    body = await request.json()
    k = STATE["n"]
    STATE["n"] += 1
    STATE["bodies"].append(body)
    if _hit(k, STATE["fail_every"]):
        return JSONResponse({"error": {"message": "rate limited", "code": 429}}, status_code=429)
    chat = "messages" in body
    prompt = body["messages"][-1]["content"] if chat else body["prompt"]
    cached = 0
    if isinstance(prompt, list):
        n_prompt = len(prompt)
        for end in range(BLOCK, n_prompt + 1, BLOCK):
            key = tuple(prompt[:end])
            if key in STATE["seen"] and cached == end - BLOCK:
                cached = end
            STATE["seen"].add(key)
    else:
        n_prompt = len(prompt.split())
    n_out, first = body["max_tokens"], SLOW_FIRST if _hit(k, STATE["slow_every"]) else FIRST
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text, finish=None, **extra):
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"delta": {"content": text}} if chat else {"text": text})
        return f"data: {json.dumps({'id': 'x', 'object': obj, 'choices': [choice], **extra})}\n\n"

    async def stream():
        if chat:  # role-only chunk before any token: must not count as the first token
            yield f"data: {json.dumps({'object': obj, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
        await asyncio.sleep(first)
        done = 0
        while done < n_out:
            if done >= 2 and _hit(k, STATE["sse_error_every"]):
                yield f"data: {json.dumps({'error': {'message': 'boom', 'code': 500}})}\n\n"
                return
            step = min(STATE["per_chunk"], n_out - done)
            yield chunk(" tok" * step)
            done += step
            if done < n_out:
                await asyncio.sleep(ITL)
        yield chunk("", finish="length")
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        yield f"data: {json.dumps({'object': obj, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def _models(request):
    return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


@pytest.fixture(scope="module")
def base_url():
    app = Starlette(routes=[Route("/v1/completions", _completions, methods=["POST"]),
                            Route("/v1/chat/completions", _completions, methods=["POST"]),
                            Route("/v1/models", _models)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def run(base_url, **kw):
    kw.setdefault("warmup_requests", 0)
    kw.setdefault("save_details", True)
    cfg = bs.BenchConfig(base_url=base_url, **{"num_prompts": 8, "random_input_len": 32,
                                               "random_output_len": 6, "timeout": 10, **kw})
    return asyncio.run(bs.run_benchmark(cfg))


@pytest.mark.parametrize("endpoint", bs.ENDPOINTS)
def test_random_dataset(base_url, endpoint):
    _reset()
    m = run(base_url, endpoint=endpoint, max_concurrency=4, model="m")
    assert (m["completed"], m["failed"], m["errors"]) == (8, 0, {})
    assert m["total_output_tokens"] == 8 * 6
    if endpoint == "/v1/completions":  # exact token-id prompts
        assert m["total_input_tokens"] == 8 * 32
        assert all(isinstance(b["prompt"], list) and len(b["prompt"]) == 32 for b in STATE["bodies"])
    else:  # random words, one "token" each for the fake server
        assert m["total_input_tokens"] == 8 * 32
        assert all(isinstance(b["messages"][0]["content"], str) for b in STATE["bodies"])
    body = STATE["bodies"][0]
    assert body["model"] == "m" and body["max_tokens"] == 6 and body["temperature"] == 0
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    d = m["duration"]
    assert m["request_throughput"] == pytest.approx(8 / d)
    assert m["output_throughput"] == pytest.approx(48 / d)
    assert m["total_token_throughput"] == pytest.approx(m["input_throughput"] + m["output_throughput"])
    assert FIRST * 1e3 <= m["mean_ttft_ms"] < FIRST * 1e3 + 150
    assert m["median_ttft_ms"] <= m["p90_ttft_ms"] <= m["p99_ttft_ms"]
    assert all(len(r["itl_ms"]) == 5 for r in m["details"])
    assert all(x >= 0 for r in m["details"] for x in r["itl_ms"])  # single gaps jitter (TCP, timers)
    assert ITL * 1e3 * 0.8 <= m["mean_itl_ms"] < ITL * 1e3 + 50
    assert ITL * 1e3 * 0.8 <= m["mean_tpot_ms"] < ITL * 1e3 + 50
    assert m["mean_e2e_ms"] >= m["mean_ttft_ms"] + 5 * ITL * 1e3 * 0.8
    assert m["total_cached_tokens"] == 0 and m["cache_hit_rate"] == 0
    assert m["good_requests"] is None and m["request_goodput"] is None


def test_multi_token_chunks_use_usage_counts(base_url):
    _reset(per_chunk=4)  # 6 tokens arrive as chunks of 4 + 2
    m = run(base_url, random_output_len=6, model="m")
    assert m["total_output_tokens"] == 48
    assert all(len(r["itl_ms"]) == 1 and r["completion_tokens"] == 6 for r in m["details"])
    for r in m["details"]:  # TPOT spreads the post-first-chunk time over 5 tokens
        assert r["e2e_ms"] >= r["ttft_ms"]
    assert m["mean_tpot_ms"] < m["mean_itl_ms"]


def test_shared_prefix_and_cache_accounting(base_url):
    _reset()
    m = run(base_url, dataset="shared-prefix", num_prompts=6, shared_prefix_groups=2, shared_prefix_len=32,
            shared_suffix_len=16, max_concurrency=1, warmup_requests=1)  # model from /v1/models
    assert m["model"] == "fake-model" and m["completed"] == 6
    prompts = [b["prompt"] for b in STATE["bodies"][1:]]  # [0] is the warm-up
    assert all(len(p) == 48 for p in prompts)
    assert prompts[0][:32] == prompts[2][:32] == prompts[4][:32] != prompts[1][:32] == prompts[3][:32]
    assert len({tuple(p[32:]) for p in prompts}) == 6
    assert m["total_input_tokens"] == 6 * 48
    assert m["total_cached_tokens"] == 4 * 32  # all but each group's first request hit the prefix
    assert m["cache_hit_rate"] == pytest.approx(128 / 288)


def test_shared_prefix_chat(base_url):
    _reset()
    m = run(base_url, endpoint="/v1/chat/completions", dataset="shared-prefix", num_prompts=4,
            shared_prefix_groups=2, shared_prefix_len=10, shared_suffix_len=5, model="m")
    assert m["completed"] == 4
    texts = [b["messages"][0]["content"].split() for b in STATE["bodies"]]
    groups = {tuple(t[:10]) for t in texts}
    assert len(groups) == 2 and all(len(t) == 15 for t in texts)


def test_goodput(base_url):
    _reset(slow_every=2)  # every 2nd request has TTFT 400 ms, the others 40 ms
    m = run(base_url, goodput={"ttft": 200}, model="m")
    assert m["completed"] == 8 and m["good_requests"] == 4
    assert m["request_goodput"] == pytest.approx(4 / m["duration"])
    assert m["p99_ttft_ms"] >= SLOW_FIRST * 1e3
    _reset()
    assert run(base_url, goodput={"ttft": 200, "tpot": 0.001}, model="m")["good_requests"] == 0
    _reset()
    assert run(base_url, goodput={"e2e": 5000, "tpot": 500}, model="m")["good_requests"] == 8
    with pytest.raises(ValueError, match="unknown goodput"):
        run(base_url, goodput={"latency": 1})


def test_http_and_sse_errors(base_url):
    _reset(fail_every=4)
    m = run(base_url, model="m", max_concurrency=3)
    assert (m["completed"], m["failed"]) == (6, 2)
    (msg, count), = m["errors"].items()
    assert count == 2 and msg.startswith("HTTP 429") and "rate limited" in msg
    assert m["total_output_tokens"] == 6 * 6 and m["request_throughput"] == pytest.approx(6 / m["duration"])
    assert sum(not r["success"] for r in m["details"]) == 2
    _reset(sse_error_every=3)
    m = run(base_url, model="m", num_prompts=6)
    assert (m["completed"], m["failed"]) == (4, 2)
    assert all("SSE error" in e and "boom" in e for e in m["errors"])
    _reset()
    m = run("http://127.0.0.1:9", model="m", num_prompts=2, timeout=2)  # nothing listens there
    assert (m["completed"], m["failed"]) == (0, 2) and m["mean_ttft_ms"] is None
    assert m["output_throughput"] == 0


def test_poisson_arrivals(base_url):
    a = bs.arrival_offsets(2000, 50.0, seed=3)
    assert a == bs.arrival_offsets(2000, 50.0, seed=3) and a != bs.arrival_offsets(2000, 50.0, seed=4)
    assert a[0] == 0 and all(x <= y for x, y in zip(a, a[1:]))
    assert a[-1] / 1999 == pytest.approx(1 / 50, rel=0.1)
    assert bs.arrival_offsets(5, float("inf"), 0) == [0.0] * 5
    _reset()
    m = run(base_url, request_rate=40.0, seed=7, model="m")
    sched = bs.arrival_offsets(8, 40.0, seed=7)
    assert [r["scheduled_s"] for r in m["details"]] == sched
    for r, s in zip(m["details"], sched):
        assert s - 1e-3 <= r["start_s"] < s + 0.05
    assert m["duration"] >= sched[-1]


def test_dataset_determinism_and_lengths():
    cfg = bs.BenchConfig(num_prompts=50, random_input_len=100, random_output_len=20, random_range_ratio=0.5)
    a, b = bs.sample_requests(cfg), bs.sample_requests(cfg)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert a[0].prompt != bs.sample_requests(bs.BenchConfig(**{**cfg.__dict__, "seed": 1}))[0].prompt
    assert all(50 <= r.prompt_len == len(r.prompt) <= 150 and 10 <= r.output_len <= 30 for r in a)
    assert len({r.prompt_len for r in a}) > 5
    assert all(0 <= t < cfg.vocab_size for r in a for t in r.prompt)


def test_tokenizer_prompts(base_url, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "serving benchmarks measure latency",
              "tokens per second and time to first token"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = bs.BenchConfig(num_prompts=10, random_input_len=40, tokenizer=str(tmp_path))
    reqs = bs.sample_requests(cfg, bs._Tok(cfg.tokenizer))
    for r in reqs:
        assert isinstance(r.prompt, str) and "<s>" not in r.prompt
        n = len(tok.encode(r.prompt, add_special_tokens=False).ids)
        assert n == r.prompt_len and abs(n - 40) <= 4
    _reset()
    m = run(base_url, tokenizer=str(tmp_path), model="m", dataset="shared-prefix", num_prompts=4,
            shared_prefix_groups=1, shared_prefix_len=20, shared_suffix_len=8)
    assert m["completed"] == 4 and all(isinstance(b["prompt"], str) for b in STATE["bodies"])


def test_cli(base_url, tmp_path, capsys):
    _reset(fail_every=5)
    out = tmp_path / "out.json"
    bs.main(["--base-url", base_url, "--model", "m", "--num-prompts", "5", "--random-input-len", "16",
             "--random-output-len", "3", "--request-rate", "inf", "--max-concurrency", "2",
             "--goodput", "ttft:5000", "tpot:1000", "--warmup-requests", "0", "--save-details",
             "--extra-body", '{"top_p": 0.9}', "--json", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "Serving Benchmark Result" in lines[0] and any("HTTP 429" in ln for ln in lines)
    summary = json.loads(lines[-1])
    saved = json.loads(out.read_text())
    assert "details" not in summary and len(saved["details"]) == 5
    assert summary["completed"] == saved["completed"] == 4 and summary["failed"] == 1
    assert summary["config"]["request_rate"] == "inf" and summary["config"]["goodput"] == {"ttft": 5000, "tpot": 1000}
    assert summary["good_requests"] == 4 and STATE["bodies"][0]["top_p"] == 0.9, saved["details"]
