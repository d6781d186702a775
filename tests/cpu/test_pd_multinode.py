"""Prefill and decode pools on different Ray nodes (two nodes on this machine,
ray.cluster_utils.Cluster), pinned there by custom resources: the KV moves
over a gloo pair group between workers of different nodes, and the greedy
tokens equal a mixed engine's."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from conftest import free_port  # noqa: E402
from ziggurat import LLM, SamplingParams  # noqa: E402
from ziggurat.cluster.deploy import Deployment  # noqa: E402
from ziggurat.cluster.spec import DeploymentSpec, PoolSpec  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"prefill_node": 4}})
    cluster.add_node(num_cpus=4, resources={"decode_node": 4})
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_pools_on_two_nodes_move_kv_between_nodes_and_equal_a_mixed_engine(two_nodes, llama_dir, tmp_path):
    prompts = ["a prompt computed on one node and decoded on the other", "and another one, a little longer than that"]
    llm = LLM(llama_dir, num_kv_blocks=256)
    want = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
    dep = Deployment(DeploymentSpec.from_flat(
        model=str(llama_dir), served_model_name="tiny", port=free_port(), num_kv_blocks=256, device="cpu",
        db=str(tmp_path / "ledger.db"), pd_min_prompt_tokens=4,
        pools=(PoolSpec("prefill", 1, resources={"prefill_node": 1}),
               PoolSpec("decode", 1, resources={"decode_node": 1}))))
    try:
        nodes = [{r["node_id"] for r in info.placement} for info in dep.info]
        assert len(nodes[0] | nodes[1]) == 2 and not nodes[0] & nodes[1]  # one node each
        c = openai.OpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
        for p, w in zip(prompts, want):
            assert c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text == w
        stats = ray.get(dep.schedulers[1].stats.remote())
        assert stats.kv_transfers == len(prompts) and stats.kv_transfer_failures == 0
        assert {r[1] for r in stats.recent_transfers} == {"group"}
    finally:
        dep.shutdown()
