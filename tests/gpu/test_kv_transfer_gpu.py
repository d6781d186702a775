"""KV transfer on a GPU: the one-launch copy kernel against its torch reference,
CUDA IPC between two processes on one GPU (exact), and a prefill/decode
deployment sharing one GPU whose greedy tokens equal the offline engine's."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("src_heads,dst_heads,src_lo,dst_lo,n", [(8, 8, 0, 0, 8), (8, 4, 4, 0, 4), (2, 8, 0, 6, 2)])
def test_copy_kernel_equals_the_reference(dtype, src_heads, dst_heads, src_lo, dst_lo, n):
    from ziggurat.kernels.kv_copy_triton import copy_blocks as kernel
    from ziggurat.models.kv_blocks import HeadSlice, gather_blocks, scatter_blocks

    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: [(torch.randn(40, 16, h, 128, generator=g, device="cuda").to(dtype),  # noqa: E731
                     torch.randn(40, 16, h, 128, generator=g, device="cuda").to(dtype)) for _ in range(3)]
    src, dst = mk(src_heads), mk(dst_heads)
    ref = [(k.clone(), v.clone()) for k, v in dst]
    src_ids, dst_ids = [3, 7, 0, 39, 12], [5, 1, 38, 2, 20]
    kernel(src, dst, src_ids, dst_ids, src_lo, dst_lo, n)
    scatter_blocks(ref, gather_blocks(src, src_ids, src_lo, n), dst_ids, dst_lo)
    torch.cuda.synchronize()
    for (a, b), (c, d) in zip(dst, ref):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert HeadSlice(0, src_lo, dst_lo, n).num_heads == n


def test_ipc_pull_between_two_processes_is_exact():
    from ziggurat.scripts.bench_kv_transfer import main

    assert main(["--layers", "4", "--tokens", "16,1000", "--reps", "3", "--backends", "ipc,local"]) == 0


def test_prefill_decode_on_one_gpu_equals_the_offline_engine(model_factory):
    ray = pytest.importorskip("ray")
    import requests as httpx  # on the GPU machine: requests, not httpx

    from ziggurat import LLM, SamplingParams
    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec

    model = model_factory("llama")
    prompts = [[(5 * i + 7 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([40, 100, 333])]
    llm = LLM(model, gpu_memory_utilization=0.2)
    want = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                             ignore_eos=True))]
    llm.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        dep = Deployment(DeploymentSpec.from_flat(model=str(model), served_model_name="tiny", prefill_replicas=1,
                                                  decode_replicas=1, gpus_per_worker=0.5, num_kv_blocks=2048,
                                                  pd_min_prompt_tokens=8))
        try:
            for p, w in zip(prompts, want):
                r = httpx.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 24,
                                                                  "temperature": 0, "ignore_eos": True,
                                                                  "logprobs": 0}, timeout=120).json()
                assert r["usage"]["completion_tokens"] == 24
                assert r["choices"][0]["text"] == w, p[:4]
            stats = ray.get(dep.schedulers[1].stats.remote())
            assert stats.kv_transfers == len(prompts) and stats.kv_transfer_failures == 0
            assert {r[1] for r in stats.recent_transfers} == {"ipc"}
        finally:
            dep.shutdown()
    finally:
        ray.shutdown()
