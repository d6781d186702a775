"""A mixed step's attention (kernels/attention.py::paged_attention): its one-query sequences
(decodes) go through the decode kernel and the rest through the prefill kernel, which skips
them; both equal the torch reference, and so does the A/B path that keeps every row in the
prefill kernel. Through Triton's interpreter on a CPU."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEV, interpreted_triton, paged_case, step_kv

triton = interpreted_triton()

from ziggurat.kernels import attention  # noqa: E402
from ziggurat.kernels import attention_triton as AT  # noqa: E402



def rel_err(out, ref) -> float:
    assert not torch.isnan(out).any()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("hkv,g,window", [(2, 4, None), (1, 2, 24)])
def test_mixed_step_equals_reference(monkeypatch, mode, hkv, g, window):
    # decodes with short and long contexts, a prompt chunk after a cached prefix, a whole prompt,
    # and a prompt's last one-token chunk: every kind of row in one batch.
    seq_lens, q_lens = [300, 40, 100, 9, 77, 520], [1, 40, 33, 1, 1, 1]
    q, kc, vc, meta = paged_case(seq_lens, q_lens, hkv, g, 16, 16, seed=hkv + g, device=DEV)
    monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
    monkeypatch.setenv("ZIGGURAT_MIXED_DECODE", mode)
    calls = []
    real_decode = AT.paged_decode
    monkeypatch.setattr(AT, "paged_decode", lambda *a, **kw: calls.append(a[0].shape[0]) or real_decode(*a, **kw))
    ref = attention.paged_attention_ref(q, kc, vc, meta, 0.25, window)
    out = attention.paged_attention(q, kc, vc, meta, 0.25, window)
    assert rel_err(out, ref) < 1e-5
    assert calls == ([4] if mode == "decode" else [])  # the four one-query sequences, in one launch
    again = attention.paged_attention(q, kc, vc, meta, 0.25, window)  # the next layer reuses the step's plan
    assert torch.equal(again, out)


def test_mixed_step_with_fresh_prompts_through_sdpa(monkeypatch):
    # The opt-in SDPA path for fresh prompts and the decode split together: three kernels, one output.
    monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
    monkeypatch.setenv("ZIGGURAT_FRESH_PREFILL", "sdpa")
    monkeypatch.setattr(attention, "SDPA_MIN_LEN", 32)
    monkeypatch.setattr(attention, "SDPA_DTYPES", (torch.float32,))
    seq_lens, q_lens = [70, 90, 45, 200], [70, 20, 1, 1]
    q, kc, vc, meta = paged_case(seq_lens, q_lens, 2, 2, 16, 16, seed=5, device=DEV)
    k, v = step_kv(kc, vc, meta)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 0.25)
    out = attention.paged_attention(q, kc, vc, meta, 0.25, None, k, v)
    assert rel_err(out, ref) < 1e-5


def test_prefill_work_lists_only_tiles_with_queries():
    # q lens 40, 1, 0 (an empty row), 130 at BLOCK_M 64; sequence 1 left to another kernel.
    work = AT.prefill_work([0, 40, 41, 41, 171], 64, skip_seqs=[1])
    assert work.tolist() == [[0, 0], [3, 0], [3, 1], [3, 2]]
    assert AT.prefill_work([0, 1, 2], 64, skip_seqs=[0, 1]).shape == (0, 2)
