"""Prefill/decode deployments end to end on CPU (Ray actors, gloo pair groups
between the pools' workers): exact greedy tokens against a mixed engine,
decode-side prefix hits, metering, cancellation mid-transfer, and the death
of either side mid-transfer."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")

from conftest import free_port, stream_completion, wait_for  # noqa: E402
from ziggurat import LLM, SamplingParams  # noqa: E402
from ziggurat.cluster.deploy import Deployment  # noqa: E402
from ziggurat.cluster.spec import DeploymentSpec  # noqa: E402

PROMPTS = ["The quick brown fox jumps over the lazy dog", "café au lait and a croissant, please",
           "1 2 3 4 5 6 7 8 9 10 11 12", "a"]


def metric(dep, name: str, **labels) -> float:
    """Sum of a /metrics series over the replicas matching labels."""
    total = 0.0
    for line in httpx.get(dep.url + "/metrics").text.splitlines():
        m = re.match(rf"ziggurat_{name}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def held_blocks(dep, replica: int) -> float:
    return metric(dep, "kv_total_blocks", replica=replica) - metric(dep, "kv_free_blocks", replica=replica)


def ledger(db) -> dict[str, tuple]:
    try:
        rows = sqlite3.connect(db).execute(
            "SELECT request_id, status, prompt_tokens, cached_tokens, completion_tokens, replica, prefill_replica "
            "FROM usage_events").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {r[0]: r[1:] for r in rows}


@pytest.fixture(scope="module")
def offline(llama_dir):
    llm = LLM(llama_dir, num_kv_blocks=256)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=16)))}


@pytest.mark.parametrize("pools", [dict(prefill_replicas=1, decode_replicas=1),
                                   dict(prefill_replicas=1, decode_replicas=2),
                                   dict(prefill_replicas=1, decode_replicas=1, prefill_tensor_parallel_size=2)],
                         ids=["1P1D", "1P2D", "tp2P-tp1D"])
def test_greedy_tokens_equal_a_mixed_engine(ray_cluster, llama_dir, offline, tmp_path, pools):
    db = str(tmp_path / "ledger.db")
    dep = Deployment(DeploymentSpec.from_flat(model=str(llama_dir), served_model_name="tiny", port=free_port(),
                                              num_kv_blocks=256, device="cpu", db=db, pd_min_prompt_tokens=6,
                                              **pools))
    try:
        assert [s["role"] for s in dep.status()] == ["prefill"] + ["decode"] * pools["decode_replicas"]
        c = openai.OpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        ids = []
        for p in PROMPTS:
            r = c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
            assert r.choices[0].text == offline[p], p
            ids.append(r.id.removeprefix("cmpl-") + "-0")  # its engine request (sample 0)
            texts = {}
            for ch in c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True, n=2):
                for cc in ch.choices:
                    texts[cc.index] = texts.get(cc.index, "") + cc.text
            assert texts == {0: offline[p], 1: offline[p]}, p
        # Decode-side prefix hits: the same long prompt again moves fewer blocks.
        long = " ".join(PROMPTS[:3])
        sums = []
        for _ in range(2):
            before = metric(dep, "kv_transfer_bytes_sum")
            c.completions.create(model="tiny", prompt=long, max_tokens=4, temperature=0)
            wait_for(lambda: metric(dep, "kv_transfer_bytes_sum") > before, what="a transfer")
            sums.append(metric(dep, "kv_transfer_bytes_sum") - before)
        if pools["decode_replicas"] == 1:
            assert sums[1] < sums[0] / 2, sums
        assert metric(dep, "kv_transfers_total") >= 3 * len(PROMPTS) - 3  # "a" is served whole
        assert metric(dep, "kv_transfer_failures_total") == 0
        # Nothing stays held once everything is done; one ledger row per request.
        n = 1 + pools["decode_replicas"]
        wait_for(lambda: all(held_blocks(dep, r) == 0 for r in range(n)), what="zero blocks held")
        assert metric(dep, "kv_sending_requests") == 0 and metric(dep, "kv_receiving_requests") == 0
        wait_for(lambda: all(f"{i}" in ledger(db) for i in ids[:3]), what="usage events")
        rows = ledger(db)
        for rid in ids[:3]:  # prefill on 0, decoded elsewhere, one event
            status, prompt, cached, completion, replica, prefill = rows[rid]
            assert status == "length" and completion == 16 and prefill == 0 and replica >= 1
        status, *_, replica, prefill = rows[ids[3]]  # "a": below pd_min_prompt_tokens
        assert prefill is None and replica >= 1
    finally:
        dep.shutdown()


@pytest.fixture(scope="module")
def slow_dep(ray_cluster, llama_dir, tmp_path_factory):
    """1P + 1D whose decode workers hold every pull open for 1.5 s (a drill), so tests
    can act while a transfer is in flight."""
    db = str(tmp_path_factory.mktemp("pd") / "ledger.db")
    dep = Deployment(DeploymentSpec.from_flat(
        model=str(llama_dir), served_model_name="tiny", port=free_port(), num_kv_blocks=256, device="cpu", db=db,
        prefill_replicas=1, decode_replicas=1, pd_min_prompt_tokens=4, interval_s=0.25, kv_transfer_timeout_s=5.0,
        extra={"kv_pull_delay_s": 1.5}))
    dep.db_path = db
    yield dep
    dep.shutdown()


def _receiving(dep) -> int:
    return ray.get(dep.schedulers[1].stats.remote()).num_receiving


def test_cancellation_during_the_transfer_frees_both_sides(slow_dep):
    dep = slow_dep

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", dep.url + "/v1/completions", json={
                    "model": "tiny", "prompt": "cancel me during the pull " * 3, "max_tokens": 50, "stream": True,
                    "ignore_eos": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # the first token (from the prefill side); the pull is in flight now
                assert _receiving(dep) == 1
                return r.headers["x-request-id"]  # leaving the block closes the connection

    rid = asyncio.run(main())
    wait_for(lambda: held_blocks(dep, 0) == 0 and held_blocks(dep, 1) == 0 and _receiving(dep) == 0, 15,
             "zero blocks held")
    wait_for(lambda: f"{rid}-0" in ledger(dep.db_path), what="its usage event")
    status, prompt, cached, completion, replica, prefill = ledger(dep.db_path)[f"{rid}-0"]
    assert status == "client_disconnected" and replica == 1 and prefill == 0 and completion >= 1


@pytest.mark.parametrize("victim", [1, 0], ids=["kill-decode", "kill-prefill"])
def test_death_of_either_side_mid_transfer_fails_the_request_cleanly(slow_dep, victim):
    dep = slow_dep
    wait_for(lambda: all(s["state"] == "serving" for s in dep.status()), 60, "every replica serving")

    def kill():
        wait_for(lambda: _receiving(dep) == 1, 5, "the pull in flight")
        ray.kill(dep.schedulers[victim], no_restart=True)

    async def main():
        loop = asyncio.get_running_loop()
        return await stream_completion(dep.url, {"model": "tiny", "prompt": f"kill replica {victim} mid transfer " * 3,
                                                 "max_tokens": 30, "ignore_eos": True},
                                       on_token=lambda: loop.run_in_executor(None, kill))

    t0 = time.monotonic()
    rid, got, error = asyncio.run(main())
    assert time.monotonic() - t0 < 30
    assert error is not None and error["code"] == "replica_failed", error
    assert got == 1  # the first token had streamed; then a clean SSE error
    survivor = 1 - victim
    # The survivor frees what it held for the request (bound: the supervisor's notice, or the deadline).
    wait_for(lambda: held_blocks(dep, survivor) == 0, 20, "the survivor's blocks freed")
    # The usage is what the client received, once.
    wait_for(lambda: f"{rid}-0" in ledger(dep.db_path), what="its usage event")
    status, prompt, cached, completion, *_ = ledger(dep.db_path)[f"{rid}-0"]
    assert status == "replica_failed" and completion == got
    # The dead side is rebuilt and the pair serves again.
    wait_for(lambda: all(s["state"] == "serving" for s in dep.status()), 60, "the rebuild")
    wait_for(lambda: dep.status()[victim]["rebuilds"] >= 1, 5, "a rebuild")
    r = httpx.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": "after the rebuild " * 3,
                                                       "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
