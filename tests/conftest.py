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
