"""End to end over HTTP with the official openai client, against real
deployments (Ray actors: ingress, router, schedulers, workers) on CPU."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")

from ziggurat import LLM, SamplingParams  # noqa: E402
from conftest import free_port  # noqa: E402
from ziggurat.cluster.deploy import Deployment, DeploymentSpec  # noqa: E402

KEY = "sk-test-0123456789"




@pytest.fixture(scope="module")
def dep(ray_cluster, llama_dir):
    d = Deployment(DeploymentSpec.from_flat(model=str(llama_dir), served_model_name="tiny", port=free_port(),
                                  api_keys=(KEY,), num_kv_blocks=512, max_num_batched_tokens=256, device="cpu"))
    yield d
    d.shutdown()


@pytest.fixture(scope="module")
def client(dep):
    return openai.OpenAI(base_url=dep.base_url, api_key=KEY, max_retries=0)




def metrics(dep) -> dict[str, float]:
    text = httpx.get(dep.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"ziggurat_(\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def test_models_health_and_request_id(dep, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(dep.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    raw = client.completions.with_raw_response.create(model="tiny", prompt="hi", max_tokens=2)
    rid = raw.headers["x-request-id"]
    assert raw.parse().id == f"cmpl-{rid}"


def test_greedy_http_equals_offline(dep, client, llama_dir):
    prompts = ["The quick brown fox", "café au lait", "1 2 3 4"]
    llm = LLM(llama_dir, num_kv_blocks=256)
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    for p, o in zip(prompts, offline):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
        assert r.choices[0].text == o.outputs[0].text
        assert r.usage.completion_tokens == len(o.outputs[0].token_ids)
        assert r.choices[0].finish_reason == o.outputs[0].finish_reason
    # Chat: the template is applied in the ingress, then the same engine.
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    ids = llm.get_tokenizer().encode_chat(msgs)
    ref = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert chat.choices[0].message.content == ref.text
    assert chat.usage.prompt_tokens == len(ids)


def test_structured_outputs_through_the_worker_actors(client, llama_dir):
    """The compiled-graph path defers sampling too (masks ride on the next call): the
    served text equals the offline engine's and obeys the grammar, sampled or greedy."""
    pytest.importorskip("xgrammar")
    from ziggurat import StructuredOutputsParams

    pattern = "(ab|cd|efg){4,9}x"
    with LLM(llama_dir, num_kv_blocks=256) as llm:
        ref = llm.generate(["The quick brown fox"], SamplingParams(
            temperature=0, max_tokens=48, structured_outputs=StructuredOutputsParams(regex=pattern)),
            use_tqdm=False)[0].outputs[0].text
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=48, temperature=0,
                                  extra_body={"structured_outputs": {"regex": pattern}})
    assert r.choices[0].text == ref and re.fullmatch(pattern, ref)
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=60, temperature=1.5, n=6, seed=4,
                                  extra_body={"structured_outputs": {"regex": pattern}})
    texts = [c.text for c in r.choices]
    assert all(re.fullmatch(pattern, t) for t in texts), texts


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens_details.cached_tokens == 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "count"}],
                                          max_tokens=10, temperature=0)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    # Completions streaming without include_usage: no usage field anywhere.
    comp = list(client.completions.create(model="tiny", prompt="abc", max_tokens=5, stream=True))
    assert all(c.usage is None for c in comp)


def test_cached_tokens_on_repeated_long_prompt(client):
    prompt = "The history of the city begins long ago. " * 12
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    n = first.usage.prompt_tokens
    assert n > 64
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    assert second.choices[0].text == first.choices[0].text


def test_n_stop_max_tokens_seed_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == 16
    again = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, n=2, temperature=1.0, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]

    free = client.completions.create(model="tiny", prompt="Stop here", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    stop = free.choices[0].text[6:9]
    cut = client.completions.create(model="tiny", prompt="Stop here", max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == free.choices[0].text[: free.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    lp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                        temperature=0, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    clp = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0, logprobs=1)
    assert len(clp.choices[0].logprobs.token_logprobs) == 3


def test_errors_map_to_sdk_exceptions(dep, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 3000, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    bad_key = openai.OpenAI(base_url=dep.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = httpx.post(dep.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and "x-request-id" in r.headers
    r = httpx.post(dep.url + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_abandoned_streams_free_everything(dep, client):
    async def abandon(i):
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", dep.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                                   json={"model": "tiny", "prompt": f"request {i} " * 8, "max_tokens": 2000,
                                         "stream": True, "ignore_eos": True}) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and '"text"' in line:
                        return True  # first token seen: walk away

    async def run():
        return await asyncio.gather(*[abandon(i) for i in range(50)])

    assert all(asyncio.run(run()))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = metrics(dep)
        if m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0 and m["kv_free_blocks"] == m["kv_total_blocks"]:
            break
        time.sleep(0.2)
    assert m["num_requests_running"] == 0 and m["kv_free_blocks"] == m["kv_total_blocks"], m
    r = client.completions.create(model="tiny", prompt="after", max_tokens=4)
    assert r.usage.completion_tokens == 4


@pytest.mark.slow
def test_two_replicas_tp2_queue_full_and_unhealthy(ray_cluster, llama_dir, dep):
    d = Deployment(DeploymentSpec.from_flat(model=str(llama_dir), served_model_name="tiny", port=free_port(), replicas=2,
                                  tensor_parallel_size=2, num_kv_blocks=256, max_num_seqs=2, max_waiting=2,
                                  device="cpu"))
    try:
        c = openai.OpenAI(base_url=d.base_url, api_key="none", max_retries=0)
        # Greedy over TP=2 replicas equals the TP=1 deployment's.
        ref = openai.OpenAI(base_url=dep.base_url, api_key=KEY, max_retries=0)
        for p in ("alpha beta", "gamma delta epsilon"):
            a = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
            b = ref.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
            assert a == b
        # Both replicas get work (least load).
        async def burst(n, max_tokens):
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*[http.post(d.url + "/v1/completions", json={
                    "model": "tiny", "prompt": f"p{i}", "max_tokens": max_tokens, "ignore_eos": True}) for i in range(n)])
        codes = [r.status_code for r in asyncio.run(burst(24, 64))]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        limited = next(r for r in asyncio.run(burst(24, 64)) if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
        # n=2 into full queues: a request whose second sample is refused gets its
        # 429 and its accepted first sample ends too (all or none), so nothing is left behind.
        async def burst_n2(n):
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*[http.post(d.url + "/v1/completions", json={
                    "model": "tiny", "prompt": f"q{i}", "max_tokens": 32, "n": 2, "ignore_eos": True})
                    for i in range(n)])
        codes = [r.status_code for r in asyncio.run(burst_n2(12))]
        assert 429 in codes and set(codes) <= {200, 429}
        deadline = time.time() + 30
        while time.time() < deadline:
            st = ray.get([s.stats.remote() for s in d.schedulers])
            if all(x.num_running == 0 and x.num_waiting == 0 and x.num_free_blocks == x.num_blocks for x in st):
                break
            time.sleep(0.2)
        assert all(x.num_running == 0 and x.num_waiting == 0 and x.num_free_blocks == x.num_blocks for x in st), st
        steps = [s.steps for s in ray.get([s.stats.remote() for s in d.schedulers])]
        assert all(s > 0 for s in steps)
        # Replicas gone -> 503.
        for s in d.schedulers:
            ray.kill(s)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        d.shutdown()


def test_several_ingresses_share_the_port(ray_cluster, llama_dir):
    d = Deployment(DeploymentSpec.from_flat(model=str(llama_dir), served_model_name="tiny", port=free_port(), ingresses=2,
                                  num_kv_blocks=256, device="cpu"))
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as http:
                return await asyncio.gather(*[http.post(d.url + "/v1/completions", json={
                    "model": "tiny", "prompt": f"p{i}", "max_tokens": 4}) for i in range(24)])

        assert all(r.status_code == 200 for r in asyncio.run(burst()))
        served = ray.get([ing.requests_served.remote() for ing in d.ingresses])
        assert sum(served) == 24 and all(n > 0 for n in served), served  # the kernel spread the connections
    finally:
        d.shutdown()


def test_cli_chat_and_complete_stream_from_the_endpoint(dep, client, capsys, tmp_path):
    from ziggurat.cluster.cli import main

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    common = ["--base-url", dep.base_url, "--api-key-file", str(key_file), "--max-tokens", "6", "--temperature", "0"]
    assert main(["chat", "hello", *common]) == 0
    want = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=6, temperature=0).choices[0].message.content
    assert capsys.readouterr().out == want + "\n"
    assert main(["complete", "Once upon", *common]) == 0
    want = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0).choices[0].text
    assert capsys.readouterr().out == want + "\n"
    assert main(["chat", "x", *common, "--model-name", "nope"]) == 1


def test_port_in_use_is_refused(ray_cluster, llama_dir, dep):
    port = int(dep.url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match=f"cannot serve on 127.0.0.1:{port}"):
        Deployment(DeploymentSpec.from_flat(model=str(llama_dir), port=port, num_kv_blocks=64, device="cpu"))
