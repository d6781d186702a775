"""Causal attention over a paged KV cache, for prefill, chunked prefill and decode.

One batch mixes sequences at any stage. Sequence b owns query rows
[query_start_loc[b], query_start_loc[b+1]) of the flattened token batch; its
context is seq_lens[b] tokens, of which the last q_len_b are the queries
(whose KV has already been stored). Its KV lives in the blocks listed in
block_tables[b] (block ids, in order). Query i of sequence b sits at
position seq_lens[b] - q_len_b + i and sees keys at positions <= its own
(and > its own - window with a sliding window).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from ziggurat.kernels.backend import env_choice, use_triton


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, where each new token's KV goes
    query_start_loc: torch.Tensor  # [B+1] integer (the runner sends int64)
    seq_lens: torch.Tensor  # [B] integer, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32; entries past a sequence's blocks are ignored
    # Host copies for reference paths and launch grids (no device sync needed).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # Per-step plans the attention layers share (computed by the first layer).
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


# Opt-in (ZIGGURAT_FRESH_PREFILL=sdpa): prompts at least SDPA_MIN_LEN long
# with nothing cached before them (the whole context is this step's keys) run
# through torch's SDPA on the dense k/v of the step instead of the paged
# kernel. Measured on an H100 (BENCHMARKS.md, 2026-11-24): the attention kernel
# alone is faster (flash 228 vs paged 172 TFLOP/s at 4096), but the K/V head
# expansion and layout copies around it cost as much, and the offline 32 x 4096
# workload ran 9% slower end to end, so the paged kernel is the default.
SDPA_MIN_LEN = 256
SDPA_DTYPES = (torch.float16, torch.bfloat16)  # fp32 stays on the paged kernel (exact products)
# Backends SDPA may pick for them. cuDNN's is left out: it builds an execution
# plan per new sequence length, and prompt lengths rarely repeat.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]. Returns [T, Hq, D].
    k, v: this step's keys/values [T, Hkv, D] (already stored), which lets
    fresh prompts skip the cache. k_scale / v_scale: an FP8 cache's 0-d scales
    (the cache holds k / k_scale: kernels/kv_cache.py)."""
    if use_triton(q):
        from ziggurat.kernels import attention_triton as T

        if meta.decode_only:
            return T.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
                                  sliding_window, k_scale=k_scale, v_scale=v_scale)
        # An FP8 cache holds rounded keys: fresh prompts read it too, so every row sees the same numbers.
        use_sdpa = (k is not None and k_cache.dtype != torch.float8_e4m3fn and sliding_window is None
                    and env_choice("ZIGGURAT_FRESH_PREFILL", ("paged", "sdpa")) == "sdpa")
        plan = _mixed_plan(meta, q, k_cache.shape[1], use_sdpa)
        out = torch.empty_like(q)
        if plan.work.shape[0]:
            T.paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            meta.max_query_len, scale, sliding_window, work=plan.work, out=out, k_scale=k_scale,
                            v_scale=v_scale)
        single = plan.single
        if single is not None:
            out.index_copy_(0, single.tokens, T.paged_decode(
                q.index_select(0, single.tokens), k_cache, v_cache, single.block_tables, single.seq_lens,
                single.max_seq_len, scale, sliding_window, k_scale=k_scale, v_scale=v_scale))
        for qs, qe in plan.fresh:
            out[qs:qe] = _sdpa_causal(q[qs:qe], k[qs:qe], v[qs:qe], scale)
        return out
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale)


@dataclass
class SingleQueryRows:
    """A mixed step's sequences with one query (decodes, a prompt's last one-token chunk): they go
    through the decode kernel, the rest through the prefill kernel (which leaves them out)."""

    count: int
    tokens: torch.Tensor  # [n] int64: their query rows in the token batch
    block_tables: torch.Tensor  # [n, max_blocks]: theirs, gathered once a step
    seq_lens: torch.Tensor  # [n]
    max_seq_len: int


@dataclass
class MixedPlan:
    """How a step that is not decode-only splits its sequences between the kernels, planned by
    its first attention layer and shared by the rest (meta.cache)."""

    work: torch.Tensor  # the prefill kernel's (sequence, query tile) items (attention_triton.prefill_work)
    single: SingleQueryRows | None  # one-query sequences, through the decode kernel
    fresh: list  # [(start, end)] token ranges of fresh prompts through SDPA (opt-in)


# Below this many one-query sequences a mixed step keeps them in the prefill kernel: a one-query
# sequence there reads its whole context once per query head, G times what the decode kernel
# reads, with no split over the context, in query tiles of BLOCK_M rows of which one is live.
# ZIGGURAT_MIXED_DECODE=prefill keeps every row in the prefill kernel (the A/B).
MIXED_DECODE_MIN_ROWS = 1


def _mixed_plan(meta: AttentionMetadata, q: torch.Tensor, block_size: int, use_sdpa: bool) -> MixedPlan:
    from ziggurat.kernels import attention_triton as T

    plan = meta.cache.get("mixed")
    if plan is not None:
        return plan
    qsl, lens, dev = meta.query_start_loc_cpu, meta.seq_lens_cpu, q.device
    fresh = [b for b in range(meta.num_seqs) if qsl[b + 1] - qsl[b] == lens[b] >= SDPA_MIN_LEN] \
        if use_sdpa and q.dtype in SDPA_DTYPES else []
    single = None
    seqs = []
    if env_choice("ZIGGURAT_MIXED_DECODE", ("decode", "prefill")) == "decode":
        seqs = [b for b in range(meta.num_seqs) if qsl[b + 1] - qsl[b] == 1]
        if len(seqs) < MIXED_DECODE_MIN_ROWS:
            seqs = []
    if seqs:
        idx = torch.tensor(seqs, dtype=torch.int64).to(dev, non_blocking=True)
        single = SingleQueryRows(
            count=len(seqs), tokens=torch.tensor([qsl[b] for b in seqs], dtype=torch.int64).to(dev, non_blocking=True),
            block_tables=meta.block_tables.index_select(0, idx), seq_lens=meta.seq_lens.index_select(0, idx),
            max_seq_len=max(lens[b] for b in seqs))
    work = T.prefill_work(qsl, T.prefill_block_m(q, block_size), fresh + seqs)
    plan = meta.cache["mixed"] = MixedPlan(torch.from_numpy(work).to(dev, non_blocking=True), single,
                                           [(qsl[b], qsl[b + 1]) for b in fresh])
    return plan


def _sdpa_causal(q, k, v, scale, backends=None):
    """q [L, Hq, D], k/v [L, Hkv, D] -> [L, Hq, D], causal. K/V heads are
    expanded to the query heads (not every backend takes GQA)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    with sdpa_kernel(backends or SDPA_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            is_causal=True, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def paged_attention_ref(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None,
                        k_scale=None, v_scale=None):
    if meta.decode_only:
        return _decode(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale)
    out = torch.empty_like(q)
    for b in range(meta.num_seqs):
        qs, qe = meta.query_start_loc_cpu[b], meta.query_start_loc_cpu[b + 1]
        out[qs:qe] = _one_sequence(
            q[qs:qe], k_cache, v_cache, meta.block_tables[b], meta.seq_lens_cpu[b], scale, sliding_window,
            k_scale, v_scale
        )
    return out


def _dequant(x: torch.Tensor, scale) -> torch.Tensor:
    """Cache values in fp32: an FP8 cache's times its scale (None: 1.0)."""
    return x.float() if scale is None else x.float() * scale.float()


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, ctx_len: int) -> torch.Tensor:
    bs = cache.shape[1]
    nblocks = (ctx_len + bs - 1) // bs
    blocks = cache.index_select(0, block_table[:nblocks].long())  # [n, bs, H, D]
    return blocks.reshape(-1, *cache.shape[2:])[:ctx_len]


def _one_sequence(q, k_cache, v_cache, block_table, ctx_len, scale, window, k_scale=None, v_scale=None):
    q_len, hq, d = q.shape
    k = _dequant(_gather_context(k_cache, block_table, ctx_len), k_scale)  # [ctx, Hkv, D]
    v = _dequant(_gather_context(v_cache, block_table, ctx_len), v_scale)
    group = hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, ctx, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    qf = q.transpose(0, 1).float()  # [Hq, L, D]
    scores = torch.matmul(qf, k.transpose(1, 2)) * scale  # [Hq, L, ctx]
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device).unsqueeze(1)
    k_pos = torch.arange(ctx_len, device=q.device).unsqueeze(0)
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1).to(q.dtype)


def _decode(q, k_cache, v_cache, meta, scale, window, k_scale=None, v_scale=None):
    """All sequences have one query: batched gather of their blocks."""
    b, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    max_blocks = (meta.max_seq_len + bs - 1) // bs
    tables = meta.block_tables[:, :max_blocks].long()
    # In fp32 like the prefill path, so a position's result does not depend
    # on whether it ran as decode or as a prefill chunk.
    k = _dequant(k_cache[tables].reshape(b, max_blocks * bs, hkv, d), k_scale)
    v = _dequant(v_cache[tables].reshape(b, max_blocks * bs, hkv, d), v_scale)
    qg = q.float().view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k) * scale
    k_pos = torch.arange(max_blocks * bs, device=q.device).view(1, 1, 1, -1)
    seq = meta.seq_lens.view(b, 1, 1, 1).to(k_pos.dtype)
    visible = k_pos < seq
    if window is not None:
        visible &= k_pos >= seq - window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past a sequence's end hold whatever the cache held (NaN in fresh
    # memory); 0 * NaN would poison the sum, so zero them.
    v = v.masked_fill(~visible.view(b, -1, 1, 1), 0.0)
    out = torch.einsum("bkgs,bskd->bkgd", probs, v)
    return out.reshape(b, hq, d).to(q.dtype)
