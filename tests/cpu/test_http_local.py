"""The HTTP app over an in-process engine (LocalEngineClient): no Ray, no sockets.

Protocol edge cases live here, where they are cheap; the Ray deployment tests
(test_serving.py, test_tenancy_serving.py) stay the end-to-end layer.
"""

from __future__ import annotations

import asyncio
import re
import json

import pytest

httpx = pytest.importorskip("httpx")

from ziggurat import LLM, SamplingParams  # noqa: E402
from conftest import OpenAIApp  # noqa: E402
from ziggurat.actors import metrics  # noqa: E402
from ziggurat.actors.ingress.gatekeeper import Gatekeeper  # noqa: E402
from ziggurat.actors.ingress.local_engine import LocalEngineClient  # noqa: E402
from ziggurat.actors.ingress.server import IngressConfig, OpenAIServer  # noqa: E402
from ziggurat.actors.scheduler.engine import EngineCore  # noqa: E402
from ziggurat.config import EngineConfig  # noqa: E402

MAX_LEN = 256


@pytest.fixture(scope="module")
def app(llama_dir):
    """(run, server): run(coro_fn) runs coro_fn(http_client) on a fresh event loop
    bound to the app's engine client."""
    app = OpenAIApp(llama_dir, num_kv_blocks=256, max_model_len=MAX_LEN)
    yield (lambda fn: app.run(lambda http, sdk: fn(http))), app.server
    app.close()


def post(run, path, body):
    async def fn(http):
        return await http.post(path, json=body)

    return run(fn)


def sse(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_greedy_http_equals_offline_with_stop_strings_and_n(app, llama_dir):
    """One output processor: the HTTP server's text, finish reasons and stop
    reasons equal LLM.generate's for the same request (a stop string that ends
    mid-generation, n=2 with a seed)."""
    run, _ = app
    llm = LLM(llama_dir, device="cpu", num_kv_blocks=128, max_model_len=MAX_LEN)
    try:
        free = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
        text = free.outputs[0].text
        stop = text[len(text) // 2: len(text) // 2 + 2]  # a string it will produce
        assert stop.strip(), text
        params = dict(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
        ref = llm.generate([[5, 6, 7, 8]], SamplingParams(**params))[0].outputs[0]
        sampled = llm.generate([[5, 6, 7, 8]], SamplingParams(n=2, seed=3, max_tokens=6, ignore_eos=True))[0]
    finally:
        llm.shutdown()
    assert ref.finish_reason == "stop" and ref.stop_reason == stop and stop not in ref.text
    r = post(run, "/v1/completions", dict(prompt=[5, 6, 7, 8], **params))
    c = r.json()["choices"][0]
    assert (c["text"], c["finish_reason"], c["stop_reason"]) == (ref.text, "stop", stop)
    r = post(run, "/v1/completions", dict(prompt=[5, 6, 7, 8], n=2, seed=3, max_tokens=6, ignore_eos=True))
    body = r.json()
    assert [c["text"] for c in body["choices"]] == [o.text for o in sampled.outputs]
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 12  # prompt billed once


def test_streamed_deltas_add_up_to_the_whole(app):
    run, _ = app
    body = dict(prompt=[9, 10, 11], temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    whole = post(run, "/v1/completions", body).json()["choices"][0]
    r = post(run, "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True}))
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["text"]
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert "".join(tokens) == "".join(whole["logprobs"]["tokens"]) and len(tokens) == 10
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_errors_name_the_field_for_chat_and_completions(app):
    """The one validator's errors: the prompt is 'prompt' for completions and
    'messages' for chat; an explicit max_tokens beyond the context is a bound,
    not an error (generation ends with "length", as in vLLM)."""
    run, _ = app
    r = post(run, "/v1/completions", {"prompt": [1] * MAX_LEN, "max_tokens": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded" and "prompt:" in err["message"]
    r = post(run, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = post(run, "/v1/completions", {"prompt": [1, 10_000], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "vocabulary" in r.json()["error"]["message"]
    r = post(run, "/v1/completions", {"prompt": [1] * (MAX_LEN - 4), "max_tokens": 100, "ignore_eos": True})
    assert r.status_code == 200
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("field,value", [("stop_token_ids", [10**30]), ("min_tokens", 10**30), ("n", 10**6),
                                         ("seed", 2**70)])
def test_numbers_beyond_what_the_engine_holds_are_400s_and_harmless(app, field, value):
    """Regression (issue 12): these once overflowed a tensor or an int64 column
    and took the replica down for good."""
    run, _ = app
    body = {"prompt": "hi", "max_tokens": 3, field: value}
    if field == "min_tokens":
        body["max_tokens"] = None
    r = post(run, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    ok = post(run, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_metrics_use_the_registry_names(app):
    run, _ = app
    post(run, "/v1/completions", {"prompt": "hi", "max_tokens": 2})

    async def fn(http):
        return await http.get("/metrics")

    text = run(fn).text
    for m in metrics.REPLICA + metrics.INGRESS + metrics.REQUEST_HISTOGRAMS + (metrics.REQUEST_SUCCESS,):
        assert f"# TYPE {m.exported_name} {m.kind}" in text, m.name
    assert 'ziggurat_http_requests_total{status="200"}' in text
    assert 'ziggurat_engine_steps_total{model_name="tiny",replica="0"}' in text
    assert 'ziggurat_request_success_total{model_name="tiny",replica="0",finished_reason="length"} 1' in text
    # Histograms: one request of 2 tokens, its TTFT and end-to-end latency observed once.
    assert 'ziggurat_request_generation_tokens_bucket{model_name="tiny",replica="0",le="2.0"} 1' in text
    assert 'ziggurat_time_to_first_token_seconds_count{model_name="tiny",replica="0"} 1' in text
    assert 'ziggurat_e2e_request_latency_seconds_count{model_name="tiny",replica="0"} 1' in text
    assert 'ziggurat_request_queue_time_seconds_count{model_name="tiny",replica="0"} 1' in text
    # Per-tenant and routing counters (the module's app has served other tests' requests too).
    value = lambda series: float(re.search(re.escape(series) + r" ([0-9.]+)", text).group(1))  # noqa: E731
    assert value('ziggurat_tenant_requests_total{model_name="tiny",replica="0",tenant="default"}') >= 1
    assert value('ziggurat_tenant_completion_tokens_total{model_name="tiny",replica="0",tenant="default"}') >= 2
    assert value('ziggurat_routes_total{kind="whole"}') >= 1
    # Token delivery (scheduler publish -> this ingress's dispatch): at least this request's two steps.
    assert value("ziggurat_token_delivery_seconds_count{}") >= 2
    assert value('ziggurat_token_delivery_seconds_bucket{le="2.5"}') == value("ziggurat_token_delivery_seconds_count{}")


def test_health_and_models(app):
    run, _ = app

    async def fn(http):
        return await http.get("/health"), await http.get("/v1/models")

    health, models = run(fn)
    assert health.json() == {"status": "ok", "replicas": 1}
    assert models.json()["data"][0]["id"] == "tiny" and models.json()["data"][0]["max_model_len"] == MAX_LEN


# -- hostile input (issue 12) ----------------------------------------------------------


def _raw(run, path, content: bytes, headers=None):
    async def fn(http):
        return await http.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})

    return run(fn)


def test_a_body_over_the_limit_is_a_413_at_once(app):
    import time

    run, server = app
    t0 = time.perf_counter()
    r = _raw(run, "/v1/completions", b'{"prompt": "' + b"x" * (50 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert time.perf_counter() - t0 < 5  # the in-process transport still copies the 50 MB; a socket stops at the header
    assert post(run, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_malformed_bodies_are_shaped_400s(app):
    run, _ = app
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = _raw(run, "/v1/completions", deep)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = _raw(run, "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(run, "/v1/completions", {"prompt": "hi", "skip_special_tokens": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "skip_special_tokens"
    r = post(run, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5_000_000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    ids = [2**63 + 1] + [1] * 20
    r = post(run, "/v1/completions", {"prompt": ids, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_an_unhandled_exception_is_a_shaped_500_and_the_next_request_works(app, monkeypatch):
    run, server = app

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(server.tokenizer, "encode", boom)
    r = post(run, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error" and "x-request-id" in r.headers
    monkeypatch.undo()
    assert post(run, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_slow_clients_are_cut_off_after_the_read_timeout(llama_dir):
    """A real socket (uvicorn with the deadline protocol): a request head or a
    body that trickles in is cut off after read_timeout_s; others are served."""
    import socket
    import threading
    import time

    import uvicorn

    from ziggurat.actors.ingress.http_protocol import DeadlineH11Protocol

    engine = EngineCore(EngineConfig(model=str(llama_dir), device="cpu", num_kv_blocks=64, max_model_len=MAX_LEN))
    client = LocalEngineClient(engine)
    cfg = IngressConfig(served_model_name="tiny", read_timeout_s=1.0)
    server = OpenAIServer(cfg, client, Gatekeeper(None), client.info)

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            client.bind(asyncio.get_running_loop())
            client.start()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await server.asgi(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", lifespan="on",
                                       http=DeadlineH11Protocol.with_timeout(1.0)))
    th = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        while not uv.started:
            time.sleep(0.02)
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for s in slow:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the head
        body_slow = socket.create_connection(("127.0.0.1", port))
        body_slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\"")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200  # served while the slow ones wait
        # A 50 MB body is refused at its head, in well under a second, while other clients are served.
        big = {}

        def upload():
            t1 = time.monotonic()
            try:
                big["status"] = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=b"x" * (50 << 20),
                                           headers={"content-type": "application/json"}, timeout=30).status_code
            except httpx.HTTPError as e:  # the server may close before the client has sent it all
                big["status"] = type(e).__name__
            big["s"] = time.monotonic() - t1

        up = threading.Thread(target=upload)
        up.start()
        t1 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        beside = time.monotonic() - t1
        up.join(30)
        assert big["status"] in (413, "WriteError", "RemoteProtocolError"), big
        assert big["s"] < 1.0 and r.status_code == 200 and beside < 1.0, (big, beside)
        t0 = time.monotonic()
        for s in slow:
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
        body_slow.settimeout(5)
        answer = body_slow.recv(1000)
        assert b" 408 " in answer.split(b"\r\n")[0], answer[:200]
    finally:
        uv.should_exit = True
        th.join(timeout=10)
        client.stop()
        engine.shutdown()


# -- property-based fuzzing of both endpoints (bounded) ----------------------------------

def test_fuzzed_bodies_never_break_the_server(app):
    """Bodies drawn from the request types (right and wrong types, huge and
    negative numbers, odd strings, nesting): each answer is a 200 or an
    OpenAI-shaped 4xx, never a 5xx, and a normal request still works after
    every one of them."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    run, _ = app
    ints = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70))
    nums = st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True), st.just(1e308))
    text = st.text(max_size=40)
    junk = st.one_of(st.none(), st.booleans(), ints, nums, text, st.lists(ints, max_size=5),
                     st.dictionaries(text, ints, max_size=3))
    token_lists = st.lists(st.one_of(st.integers(0, 1100), ints), min_size=0, max_size=20)
    fields = {
        "model": st.one_of(st.just("tiny"), junk), "n": st.one_of(st.integers(1, 3), junk),
        "max_tokens": st.one_of(st.integers(1, 8), junk), "temperature": st.one_of(st.floats(0, 2), junk),
        "top_p": nums, "top_k": ints, "min_p": nums, "seed": ints, "stop": st.one_of(text, st.lists(text), junk),
        "stop_token_ids": st.one_of(token_lists, junk), "min_tokens": ints, "logprobs": st.one_of(ints, junk),
        "presence_penalty": nums, "frequency_penalty": nums, "repetition_penalty": nums,
        "ignore_eos": st.one_of(st.booleans(), junk), "skip_special_tokens": junk, "stream": st.booleans(),
        "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
        "echo": junk, "best_of": junk, "user": junk, "cache_salt": junk, "top_logprobs": st.one_of(ints, junk),
        "max_completion_tokens": st.one_of(st.integers(1, 8), junk), "tools": junk, "response_format": junk,
    }
    message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), junk),
                                     "content": st.one_of(text, st.lists(st.fixed_dictionaries(
                                         {"type": st.just("text"), "text": text}), max_size=2), junk)})
    # Bodies a server must serve: every field valid, at the edges of its range.
    valid = {
        "n": st.integers(1, 3), "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
        "seed": st.integers(-(2**62), 2**62), "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
        "stop_token_ids": st.lists(st.integers(0, 1023), max_size=4), "logprobs": st.integers(0, 5),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2), "ignore_eos": st.booleans(), "stream": st.booleans(),
        "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
    }
    good_prompt = st.one_of(st.text(min_size=1, max_size=60), st.lists(st.integers(0, 1023), min_size=1, max_size=30))
    good_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=60)})
    good = st.one_of(
        st.tuples(st.just("/v1/completions"), st.fixed_dictionaries({"prompt": good_prompt}, optional=valid)),
        st.tuples(st.just("/v1/chat/completions"), st.fixed_dictionaries(
            {"messages": st.lists(good_message, min_size=1, max_size=3)},
            optional={k: v for k, v in valid.items() if k != "logprobs"})))
    completion = st.fixed_dictionaries({"prompt": st.one_of(text, token_lists, st.lists(text, max_size=3), junk)},
                                       optional=fields)
    chat = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), junk)}, optional=fields)
    bad_bodies = st.one_of(st.tuples(st.just("/v1/completions"), completion),
                           st.tuples(st.just("/v1/chat/completions"), chat))
    bodies = st.one_of(good, bad_bodies)
    served = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(bodies)
    def check(case):
        path, body = case
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = max(-5, min(body["max_tokens"], 8))  # keep the run short, not the checks
        r = _raw(run, path, json.dumps(body).encode())  # NaN and Infinity as Python writes them
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        served.append(r.status_code == 200)
        if r.status_code != 200:
            err = r.json()["error"]
            assert {"message", "type", "param", "code"} <= set(err), err
        elif body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
            for chunk in sse(r.text):
                assert "error" not in chunk, chunk
        ok = post(run, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text

    check()
    assert sum(served) >= 30, sum(served)  # the valid half was served, not refused

