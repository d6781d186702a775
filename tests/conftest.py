"""Shared fixtures: tiny random-weight HF-format models made on the fly."""

from __future__ import annotations

import os
import tempfile

import pytest

# Keep the default model and ledger of deployments made by tests out of ~/.cache.
os.environ.setdefault("ZIGGURAT_CACHE", tempfile.mkdtemp(prefix="ziggurat-test-cache-"))

from ziggurat.models.maker import make_model


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(arch, **kw) -> path of a tiny model dir, made once per session per arguments."""
    cache: dict = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-model")
            cache[key] = make_model(path, arch=arch, preset="tiny", **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="session")
def qwen3_dir(model_factory):
    return model_factory("qwen3")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module (deployments of real actors)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 30.0, what: str = "condition", every: float = 0.1) -> None:
    """Poll cond() until it holds; AssertionError naming `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"{what} did not hold within {timeout} s")


async def stream_completion(url: str, body: dict, on_token=None, timeout: float = 60.0):
    """POST a streaming /v1/completions with logprobs; returns (request id, tokens received,
    the SSE error event or None). on_token() is called once, at the first token."""
    import json

    import httpx

    got, error = 0, None
    async with httpx.AsyncClient(timeout=timeout) as http:
        async with http.stream("POST", url + "/v1/completions",
                               json={**body, "stream": True, "logprobs": 0}) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                for c in chunk["choices"]:
                    got += len(c["logprobs"]["tokens"]) if c.get("logprobs") else 0
                if got and on_token is not None:
                    on_token()
                    on_token = None
    return rid, got, error


class OpenAIApp:
    """The HTTP app over an in-process engine (LocalEngineClient): no Ray, no sockets.
    `run(fn)` runs `await fn(http, sdk)` on a fresh event loop: an httpx client on the
    app (base http://t) and the official openai SDK over it (base http://t/v1)."""

    def __init__(self, model, served_model_name: str = "tiny", ingress: dict | None = None, **engine_kw):
        """ingress: more IngressConfig fields (admin_key, lora_modules, ...)."""
        from ziggurat.actors.ingress.gatekeeper import Gatekeeper
        from ziggurat.actors.ingress.local_engine import LocalEngineClient
        from ziggurat.actors.ingress.server import IngressConfig, OpenAIServer
        from ziggurat.actors.scheduler.engine import EngineCore
        from ziggurat.config import EngineConfig

        engine_kw.setdefault("device", "cpu")
        self.engine = EngineCore(EngineConfig(model=str(model), **engine_kw))
        self.client = LocalEngineClient(self.engine)
        self.server = OpenAIServer(IngressConfig(served_model_name=served_model_name, **(ingress or {})), self.client,
                                   Gatekeeper(None),
                                   self.client.info)
        self.client.start()

    def run(self, fn):
        import asyncio

        import httpx
        import openai

        async def main():
            self.client.bind(asyncio.get_running_loop())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.server.asgi), base_url="http://t",
                                         timeout=600) as http:
                sdk = openai.AsyncOpenAI(api_key="none", base_url="http://t/v1", http_client=http, max_retries=0)
                return await fn(http, sdk)

        return asyncio.run(main())

    def close(self) -> None:
        self.client.stop()
        self.engine.shutdown()
