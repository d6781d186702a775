"""Request traces: one trace per request with a span from every layer it crossed
(ingress, router, scheduler queue, prefill, KV transfer, decode, metering), the
client's traceparent honoured, parents linked; off by default, a no-op then."""

from __future__ import annotations

import json
import time

import httpx
import pytest

ray = pytest.importorskip("ray")

from conftest import free_port  # noqa: E402
from ziggurat.actors.tracing import Tracing  # noqa: E402
from ziggurat.cluster.deploy import Deployment  # noqa: E402
from ziggurat.cluster.spec import DeploymentSpec  # noqa: E402
from ziggurat.config import ConfigError, EngineConfig  # noqa: E402


def test_off_is_a_no_op():
    t = Tracing(None)
    assert not t.enabled and t.start("x") is None and t.carrier(None) is None and t.extract({"traceparent": "x"}) is None
    t.record("x", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, 0.0, 1.0)  # nothing, no error
    with pytest.raises(ConfigError, match="otlp_traces_endpoint"):
        EngineConfig(model=".", otlp_traces_endpoint="grpc://nowhere")


def test_a_request_has_one_trace_with_a_span_from_every_layer(ray_cluster, llama_dir, tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    dep = Deployment(DeploymentSpec.from_flat(
        model=str(llama_dir), served_model_name="tiny", port=free_port(), num_kv_blocks=256, device="cpu",
        db=str(tmp_path / "ledger.db"), prefill_replicas=1, decode_replicas=1, pd_min_prompt_tokens=4,
        otlp_traces_endpoint=f"file://{spans_file}"))
    try:
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        r = httpx.post(dep.url + "/v1/completions", headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                       json={"model": "tiny", "prompt": "a traced request, long enough to be handed off",
                             "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        want = {"ingress POST /v1/completions", "router.route", "scheduler.queue", "prefill", "kv_transfer",
                "decode", "metering.record"}
        deadline = time.monotonic() + 20
        spans = []
        while time.monotonic() < deadline:
            spans = [json.loads(x) for x in spans_file.read_text().splitlines()] if spans_file.exists() else []
            if want <= {s["name"] for s in spans}:
                break
            time.sleep(0.2)
        by_name = {s["name"]: s for s in spans}
        assert want <= set(by_name), sorted(by_name)
        assert {s["trace_id"] for s in spans} == {trace_id}  # one trace: the client's
        root = by_name["ingress POST /v1/completions"]
        assert root["parent_id"] == parent
        for name in want - {root["name"]}:
            assert by_name[name]["parent_id"] == root["span_id"], name
        a = root["attributes"]
        assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tiny"
        assert a["gen_ai.usage.output_tokens"] == 6 and a["gen_ai.usage.input_tokens"] > 4
        kv = by_name["kv_transfer"]["attributes"]
        assert kv["ziggurat.kv.backend"] == "group" and kv["ziggurat.kv.bytes"] > 0
        assert by_name["decode"]["attributes"]["ziggurat.prefill_replica"] == 0
        # The layers' spans sit inside the request's.
        for name in ("scheduler.queue", "prefill", "decode"):
            assert root["start"] - 1e-3 <= by_name[name]["start"] <= by_name[name]["end"] <= root["end"] + 1e-3, name
        services = {s["service"] for s in spans}
        assert any(x.startswith("ziggurat-ingress") for x in services) and "ziggurat-scheduler-1" in services
    finally:
        dep.shutdown()
