"""The HTTP app over an in-process engine (LocalEngineClient): no Ray, no sockets.

Protocol edge cases live here, where they are cheap; the Ray deployment tests
(test_serving.py, test_tenancy_serving.py) stay the end-to-end layer.
"""

from __future__ import annotations

import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")

from ziggurat import LLM, SamplingParams  # noqa: E402
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
    engine = EngineCore(EngineConfig(model=str(llama_dir), device="cpu", num_kv_blocks=256, max_model_len=MAX_LEN))
    client = LocalEngineClient(engine)
    server = OpenAIServer(IngressConfig(served_model_name="tiny"), client, Gatekeeper(None), client.info)
    client.start()

    def run(fn):
        async def main():
            client.loop = asyncio.get_running_loop()
            transport = httpx.ASGITransport(app=server.asgi)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
                return await fn(http)

        return asyncio.run(main())

    yield run, server
    client.stop()
    engine.shutdown()


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
    for m in metrics.REPLICA + metrics.INGRESS:
        assert f"# TYPE {m.exported_name} {m.kind}" in text, m.name
    assert 'ziggurat_http_requests_total{status="200"}' in text
    assert "ziggurat_engine_steps_total{replica=\"0\"}" in text


def test_health_and_models(app):
    run, _ = app

    async def fn(http):
        return await http.get("/health"), await http.get("/v1/models")

    health, models = run(fn)
    assert health.json() == {"status": "ok", "replicas": 1}
    assert models.json()["data"][0]["id"] == "tiny" and models.json()["data"][0]["max_model_len"] == MAX_LEN
