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
