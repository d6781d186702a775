"""Random paged-attention inputs shared by the CPU (interpreter) and GPU kernel tests, and the
Triton setup of the kernel test modules."""

from __future__ import annotations

import os

import pytest
import torch

from ziggurat.kernels.attention import AttentionMetadata

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def interpreted_triton():
    """Triton for a kernel test module, called before anything imports it: its interpreter on a
    machine without CUDA (patched: kernels/interpret.py); the module is skipped without Triton."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    triton = pytest.importorskip("triton")
    from ziggurat.kernels.interpret import patch_interpreter

    patch_interpreter()
    return triton


def paged_case(seq_lens, q_lens, hkv, g, d, bs, seed, dtype=torch.float32, device="cpu"):
    """Caches with each sequence's blocks scattered (not in order), and queries
    for the last q_len positions of each sequence. Returns (q, k_cache, v_cache, meta)."""
    gen = torch.Generator().manual_seed(seed)
    nb = sum((n + bs - 1) // bs for n in seq_lens) + 3
    kc = torch.randn(nb, bs, hkv, d, generator=gen).to(device, dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=gen).to(device, dtype)
    perm = torch.randperm(nb, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max((n + bs - 1) // bs for n in seq_lens), dtype=torch.int32)
    at = 0
    for i, n in enumerate(seq_lens):
        k = (n + bs - 1) // bs
        tables[i, :k] = torch.tensor(perm[at : at + k])
        at += k
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hkv * g, d, generator=gen).to(device, dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.long, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return q, kc, vc, meta


def step_kv(k_cache, v_cache, meta):
    """This step's keys and values [T, Hkv, D] (the last q_len positions of each
    sequence), read back from the cache as the attention layer would have stored them."""
    bs = k_cache.shape[1]
    ks, vs = [], []
    for b in range(meta.num_seqs):
        qs, qe = meta.query_start_loc_cpu[b], meta.query_start_loc_cpu[b + 1]
        pos = torch.arange(meta.seq_lens_cpu[b] - (qe - qs), meta.seq_lens_cpu[b], device=k_cache.device)
        blocks = meta.block_tables[b].long()[pos // bs]
        ks.append(k_cache[blocks, pos % bs])
        vs.append(v_cache[blocks, pos % bs])
    return torch.cat(ks), torch.cat(vs)
