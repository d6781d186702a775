"""A forward pass that raises (injected) fails its in-flight requests with a
clear error, their usage is what the clients received, and the supervisor
brings the replica back (TP 1, and TP 2 over gloo)."""

from __future__ import annotations

import asyncio
import pathlib
import time

import pytest

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")

from conftest import free_port, stream_completion  # noqa: E402

from ziggurat.cluster.deploy import Deployment  # noqa: E402
from ziggurat.cluster.spec import DeploymentSpec  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_an_injected_forward_failure_fails_in_flight_requests_and_the_replica_comes_back(ray_cluster, llama_dir,
                                                                                          tmp_path, tp):
    fault = tmp_path / "fault"
    dep = Deployment(DeploymentSpec.from_flat(
        model=str(llama_dir), served_model_name="tiny", port=free_port(), tensor_parallel_size=tp, num_kv_blocks=256,
        device="cpu", db=str(tmp_path / "ledger.db"), extra={"inject_fault_file": str(fault)}, interval_s=0.25))
    try:
        async def stream(i, started):
            return await stream_completion(dep.url, {"model": "tiny", "prompt": f"story {i}", "max_tokens": 200,
                                                     "ignore_eos": True}, on_token=started.set)

        async def main():
            started = asyncio.Event()
            tasks = [asyncio.ensure_future(stream(i, started)) for i in range(4)]
            await asyncio.wait_for(started.wait(), 30)
            fault.touch()  # the next step raises on every rank
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

        t0 = time.monotonic()
        results = asyncio.run(main())
        assert time.monotonic() - t0 < 60
        cut = [r for r in results if r[2] is not None]
        assert cut, results  # in flight when the forward failed
        for rid, got, error in cut:
            assert error["code"] == "replica_failed" and error["type"] == "service_unavailable", error
            assert got < 200
        # The supervisor rebuilds the replica; then it serves again.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(e["event"] == "rebuilt"
                                                       for e in ray.get(dep.supervisor.history.remote())):
            time.sleep(0.3)
        assert any(e["event"] == "rebuilt" for e in ray.get(dep.supervisor.history.remote()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 4},
                           timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.3)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert not pathlib.Path(fault).exists()
        # Usage: the cut streams are billed what their clients received.
        db = str(tmp_path / "ledger.db")
        import sqlite3

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = dict(sqlite3.connect(db).execute(
                "SELECT http_request_id, SUM(completion_tokens) FROM usage_events GROUP BY http_request_id"))
            if all(rid in rows for rid, _, _ in results):
                break
            time.sleep(0.3)
        for rid, got, error in results:
            assert rows.get(rid) == got, (rid, got, rows.get(rid), error)
    finally:
        dep.shutdown()
