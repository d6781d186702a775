"""Releasing an LLM on a GPU: two in turn in one process both run, and after
shutdown() the device memory is back to within 1 GiB of what it was before the
first (the CUDA context and Triton's caches stay)."""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def test_two_llms_in_turn_and_memory_back_after_shutdown(model_factory):
    from ziggurat import LLM, SamplingParams

    model = model_factory("llama")
    torch.zeros(1, device="cuda")  # the context exists before we measure
    before = free_bytes()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs, blocks = [], []
    for i in range(2):
        llm = LLM(str(model), gpu_memory_utilization=0.5)
        blocks.append(llm.engine.kv.num_blocks)
        outs.append(llm.generate([[1, 2, 3, 4]], params)[0].outputs[0].token_ids)
        if i == 0:
            llm.shutdown()
        else:
            del llm
            gc.collect()
        after = free_bytes()
        print(f"LLM {i}: {blocks[-1]} KV blocks; free before {before / 2**30:.2f} GiB, after release "
              f"{after / 2**30:.2f} GiB")
        assert before - after < 1 << 30, f"{(before - after) / 2**30:.2f} GiB not returned after LLM {i}"
    assert outs[0] == outs[1]
    assert blocks[1] >= 0.9 * blocks[0]  # the second sized its cache from what was really free
