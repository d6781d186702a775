"""End to end through real model engines: two in-process replicas (LocalEngineClient)
behind the HTTP app, routed by a kv-aware Router fed by the loops' own KVEvents and
stats. Requests sharing a long prefix land where it is cached, and the usage the
client receives says so."""

from __future__ import annotations

from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.config import EngineConfig


def test_shared_prefix_requests_follow_the_cache_over_http(llama_dir):
    import asyncio

    import httpx

    from ziggurat.actors.ingress.gatekeeper import Gatekeeper
    from ziggurat.actors.ingress.local_engine import LocalEngineClient
    from ziggurat.actors.ingress.server import IngressConfig, OpenAIServer

    cfg = EngineConfig(model=str(llama_dir), device="cpu", dtype="float32", num_kv_blocks=64, block_size=16)
    engines = [EngineCore(cfg), EngineCore(cfg)]
    client = LocalEngineClient(engines)
    server = OpenAIServer(IngressConfig(served_model_name="tiny"), client, Gatekeeper(None), client.info)
    client.start()
    system = [(i * 37) % 900 + 5 for i in range(320)]

    async def main():
        client.bind(asyncio.get_running_loop())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.asgi), base_url="http://t",
                                     timeout=120) as http:
            out = []
            for k in range(4):
                body = {"model": "tiny", "prompt": system + [k + 1] * 8, "max_tokens": 2, "temperature": 0}
                r = await http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                out.append(r.json()["usage"])
                await asyncio.sleep(0.05)  # the KV events of the first have reached the router
            return out

    try:
        usage = asyncio.run(main())
    finally:
        client.stop()
        for e in engines:
            e.shutdown()
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] == 0
    for u in usage[1:]:  # every later one where the 320-token prefix is cached
        assert u["prompt_tokens_details"]["cached_tokens"] == 320, usage
    r = client.router
    assert r.kv.snapshots == 2 and r.kv.gaps == 0 and r.counters["picks"] == 4
    assert r.counters["hit_blocks"] == 3 * 20 and r.kv.num_blocks(0) + r.kv.num_blocks(1) >= 20


def test_completions_return_token_ids_and_the_next_turn_hits_the_answers_blocks(llama_dir):
    """vLLM's `return_token_ids` on /v1/completions (what the routing bench sends back as a
    chat's next turn): each choice's prompt and generated ids, whole or chunk by chunk; a
    next turn made of them hits the engine's cache through the answer's full blocks (the
    last sampled token has no KV yet). A bad value is a 400 naming the field."""
    import json

    from tests.conftest import OpenAIApp

    app = OpenAIApp(llama_dir, dtype="float32", num_kv_blocks=64, block_size=16)
    prompt = [(i * 53) % 900 + 3 for i in range(70)]
    base = {"model": "tiny", "max_tokens": 30, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    async def main(http, _sdk):
        r = await http.post("/v1/completions", json={**base, "prompt": prompt})
        assert r.status_code == 200, r.text
        whole = r.json()["choices"][0]
        chunks = []
        async with http.stream("POST", "/v1/completions", json={**base, "prompt": prompt, "stream": True}) as s:
            async for line in s.aiter_lines():
                if line.startswith("data: {"):
                    chunks += json.loads(line[6:])["choices"]
        nxt = prompt + whole["token_ids"] + [7] * 20
        r2 = await http.post("/v1/completions", json={**base, "prompt": nxt, "max_tokens": 2})
        bad = await http.post("/v1/completions", json={**base, "prompt": prompt, "return_token_ids": "yes"})
        plain = await http.post("/v1/completions", json={**base, "prompt": prompt, "return_token_ids": False})
        return whole, chunks, r2.json(), bad, plain.json()["choices"][0]

    try:
        whole, chunks, turn2, bad, plain = app.run(main)
    finally:
        app.close()
    assert whole["prompt_token_ids"] == prompt and len(whole["token_ids"]) == 30
    assert all(isinstance(t, int) for t in whole["token_ids"])
    assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]  # greedy: the same answer
    assert chunks[0]["prompt_token_ids"] == prompt and not any("prompt_token_ids" in c for c in chunks[1:])
    assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] == (70 + 30 - 1) // 16 * 16
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_token_ids"
    assert "token_ids" not in plain and "prompt_token_ids" not in plain
