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
