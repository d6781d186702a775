"""Triton paged attention: split-K decode and causal prefill over the paged cache.

Cache layout (per layer, k and v alike):

    cache[num_blocks, block_size, num_kv_heads, head_dim]

Decode (every sequence has one query) is flash-decoding: each sequence's
context is cut into NUM_SPLITS equal runs of whole tiles; program (seq, kv_head, split) reads each KV
page of its split once and serves all G = Hq / Hkv query heads of that KV
head at once (GQA-aware: one read of K/V per KV head, not per query head),
keeping a running max / sum / accumulator. The splits are then merged, by
one of two epilogues (ZIGGURAT_DECODE_MERGE, or paged_decode's `merge`):

    fused (default)  one kernel. Each program writes its partial (acc, m, l), then
                     draws a ticket from its (seq, kv_head) counter (an atomic add,
                     acq_rel); the program that draws the last ticket merges all the
                     splits of its G heads and sets the counter back to 0. With one
                     split the program writes the output itself (no partial, no ticket).
    kernel           the split kernel writes partials, a second kernel merges them
                     (one program per (seq, q head)): one more launch per layer.

    partials  acc[B, Hq, S, D] fp32    ml[B, Hq, S, 2] fp32 (running max, sum)
    tickets   int32[B * Hkv] (a slice of one buffer per device, zero between calls)

Both merge with the same code (_merge_splits) in split order 0, 1, ..., so the
result does not depend on which program merges, nor on the epilogue: bitwise
equal under the interpreter.

Prefill / chunked prefill / prefix hits is one FlashAttention-style kernel:
program (q head, work item) walks the sequence's pages up to the causal limit
of its query tile. The work items are the (seq, query tile) pairs that have
queries (prefill_work, built on the host once a step), so a batch of one long
prompt and many short rows launches no empty programs, and sequences another
kernel takes (a mixed step's decodes, SDPA's fresh prompts) are simply left
out. The q heads vary fastest, so the G heads of one KV head run side by side
and read its pages from memory once. The new tokens' KV is already in the
cache (the attention layer stores before attending), so every key comes from
pages.

Both gather pages through the block table inside the kernel; nothing is
copied into a dense context first.

FP8 caches (e4m3, kernels/kv_cache.py): pages are widened to q's dtype as
they are read (exact: every e4m3 value is a bf16 value); the k scale folds
into the softmax scale and the v scale multiplies the accumulator once, so
dequantizing costs no per-element multiply.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ziggurat.kernels.backend import env_choice


@triton.jit
def _online_softmax(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    """Fold one tile of scores s [M, N] (masked entries -inf) and values v [N, D]
    into the running max m_i, sum l_i and accumulator acc [M, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr,
    acc_ptr, ml_ptr, out_ptr, tickets_ptr, ks_ptr, vs_ptr,
    scale, window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb,
    stride_at, stride_ah, stride_as,
    stride_mt, stride_mh, stride_ms,
    stride_ot, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr,
    PREC: tl.constexpr, KV_SCALED: tl.constexpr,
    EPILOGUE: tl.constexpr, G_MERGE: tl.constexpr, S_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
):
    """EPILOGUE: "partials" (a second kernel merges), "ticket" (the last split merges) or
    "direct" (NUM_SPLITS == 1: the output itself). See the module docstring."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    TILE: tl.constexpr = BLOCK_SIZE * PAGES
    # The split length follows this sequence's length (whole tiles), so the
    # grid depends on no host-side length: a CUDA graph captured once serves
    # every context length. Splits past the end store an empty partial.
    first = seq_len * 0  # the first key this sequence's splits cover
    if USE_WINDOW:
        first = tl.maximum(seq_len - window, 0)
        first = first - first % TILE
    split_len = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), TILE) * TILE
    start = first + split * split_len
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < G
    d_ok = d < D
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    if KV_SCALED:
        scale = scale * tl.load(ks_ptr)
    if start < seq_len:
        q = tl.load(q_ptr + seq * stride_qt + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        end = tl.minimum(start + split_len, seq_len)
        for t0 in range(start, end, TILE):
            t = t0 + tl.arange(0, TILE)
            t_ok = t < end
            if USE_WINDOW:
                t_ok = t_ok & (t >= seq_len - window)
            page = tl.load(tables_ptr + seq * stride_tb + t // BLOCK_SIZE, mask=t < end, other=0)
            off = t % BLOCK_SIZE
            k = tl.load(k_ptr + page[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(q_ptr.dtype.element_ty)
            s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale  # [G_PAD, TILE]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            v = tl.load(v_ptr + page[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(q_ptr.dtype.element_ty)
            m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, PREC)
    if KV_SCALED:
        acc = acc * tl.load(vs_ptr)
    heads = kvh * G + g
    if EPILOGUE == "direct":  # one split: its partial is the output (what the merge of one split gives)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        tl.store(acc_ptr + seq * stride_at + heads[:, None] * stride_ah + split * stride_as + d[None, :], acc,
                 mask=g_ok[:, None] & d_ok[None, :])
        tl.store(ml_ptr + seq * stride_mt + heads * stride_mh + split * stride_ms, m_i, mask=g_ok)
        tl.store(ml_ptr + seq * stride_mt + heads * stride_mh + split * stride_ms + 1, l_i, mask=g_ok)
    if EPILOGUE == "ticket":
        # Every thread's partial is written before one thread takes the ticket (the barrier);
        # the add releases them at GPU scope and the last ticket's acquire makes every
        # split's partial visible to the program that draws it. Every program draws a
        # ticket (none returns early), so the count always reaches NUM_SPLITS.
        tl.debug_barrier()
        counter = tickets_ptr + seq * tl.num_programs(1) + kvh
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_SPLITS - 1:
            tl.store(counter, 0)  # nobody else touches it in this call; the next call starts at 0
            live = tl.cdiv(seq_len - first, tl.maximum(split_len, 1))  # splits that saw a key
            _merge_splits(acc_ptr, ml_ptr, out_ptr, seq, kvh * G, live,
                          stride_at, stride_ah, stride_as, stride_mt, stride_mh, stride_ms, stride_ot, stride_oh,
                          NH=G, NH_PAD=G_MERGE, S_PAD=S_PAD, SB=SPLIT_BLOCK, D=D, D_PAD=D_PAD)


@triton.jit
def _merge_splits(acc_ptr, ml_ptr, out_ptr, seq, h0, live,
                  stride_at, stride_ah, stride_as, stride_mt, stride_mh, stride_ms, stride_ot, stride_oh,
                  NH: tl.constexpr, NH_PAD: tl.constexpr, S_PAD: tl.constexpr, SB: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr):
    """out[seq, h0 : h0 + NH] from the partials of splits [0, live): the global max first,
    then SB splits at a time in split order (so the sums do not depend on who merges).
    Splits past `live` saw no key (m = -inf, l = 0, acc = 0): leaving them out changes no bit.
    Loads bypass L1 (.cg): other programs wrote these partials during this kernel."""
    h = tl.arange(0, NH_PAD)
    h_ok = h < NH
    heads = h0 + h
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    ml = ml_ptr + seq * stride_mt + heads[:, None] * stride_mh  # [NH_PAD, 1]
    s = tl.arange(0, S_PAD)
    m_all = tl.load(ml + s[None, :] * stride_ms, mask=h_ok[:, None] & (s < live)[None, :], other=float("-inf"),
                    cache_modifier=".cg")
    m_max = tl.max(m_all, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # nothing seen (padding): every weight is 0
    denom = tl.zeros([NH_PAD], tl.float32)
    out = tl.zeros([NH_PAD, D_PAD], tl.float32)
    for s0 in range(0, live, SB):
        sb = s0 + tl.arange(0, SB)
        ok = h_ok[:, None] & (sb < live)[None, :]  # [NH_PAD, SB]
        m = tl.load(ml + sb[None, :] * stride_ms, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(ml + sb[None, :] * stride_ms + 1, mask=ok, other=0.0, cache_modifier=".cg")
        w = tl.where(m > float("-inf"), tl.exp(m - m_max[:, None]), 0.0)
        denom += tl.sum(w * l, 1)
        acc = tl.load(acc_ptr + seq * stride_at + heads[:, None, None] * stride_ah + sb[None, :, None] * stride_as
                      + d[None, None, :], mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        out += tl.sum(acc * w[:, :, None], 1)
    out = out / tl.where(denom == 0.0, 1.0, denom)[:, None]  # an empty (padding) sequence gives 0, not NaN
    tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_merge_kernel(
    acc_ptr, ml_ptr, out_ptr,
    stride_at, stride_ah, stride_as,
    stride_mt, stride_mh, stride_ms,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    """The two-kernel path's merge: program (seq, q head) over all NUM_SPLITS partials."""
    _merge_splits(acc_ptr, ml_ptr, out_ptr, tl.program_id(0), tl.program_id(1), NUM_SPLITS,
                  stride_at, stride_ah, stride_as, stride_mt, stride_mh, stride_ms, stride_ot, stride_oh,
                  NH=1, NH_PAD=1, S_PAD=S_PAD, SB=SPLIT_BLOCK, D=D, D_PAD=D_PAD)


def _precision(q) -> str:
    # fp32 models get exact fp32 products (the tf32 default would cost ~1e-3).
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _kv_scales(k_cache, k_scale, v_scale):
    """(k scale, v scale, scaled?) for the kernels: an FP8 cache's scales (1.0 when not given)."""
    if k_cache.dtype != torch.float8_e4m3fn:
        return k_cache, k_cache, False  # unused pointers
    one = torch.ones((), device=k_cache.device)
    return (one if k_scale is None else k_scale), (one if v_scale is None else v_scale), True


def _check_caches(q, k_cache, v_cache):
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"k/v caches must both be [blocks, block_size, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} (heads must be a multiple "
                         f"of kv heads, head_dim equal)")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")


def num_decode_splits(batch: int, num_kv_heads: int, max_seq_len: int, device) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU about
    twice over, no split shorter than 256 tokens, at most 64."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    by_len = triton.cdiv(max(1, max_seq_len), 256)
    by_grid = triton.cdiv(2 * sms, batch * num_kv_heads)
    return max(1, min(by_len, by_grid, 64))


DECODE_MERGES = ("fused", "kernel")
# fp32 partial elements the merge holds in registers per step (64 a thread at 4 warps): it folds
# MERGE_TILE // (G * D) splits a step, 16 at the 8B's G = 4, D = 128 (one step up to 16 live splits).
MERGE_TILE = 8192
MIN_TICKETS = 1 << 14  # counters allocated at first use (64 KiB): 2,048 sequences of 8 KV heads


def decode_merge() -> str:
    """ZIGGURAT_DECODE_MERGE: `fused` (default: the last split merges, one launch) or
    `kernel` (a second kernel merges: the A/B of the fusion)."""
    return env_choice("ZIGGURAT_DECODE_MERGE", DECODE_MERGES)


# One ticket buffer per device, shared by every layer and every call: calls on a
# device run one after another on its stream (a decode forward is one stream), and
# each call leaves its counters at 0. A CUDA graph records the buffer's address, so
# it never moves while a graph may replay: it grows only outside a capture (a capture
# that needs more falls back to the two-kernel merge), and a grown-out buffer is kept
# alive in _RETIRED, where graphs captured before may still address it.
_TICKETS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _tickets(device: torch.device, n: int) -> torch.Tensor | None:
    """A zeroed int32 buffer of at least n counters on `device`; None while a CUDA graph
    is being captured and the buffer would have to grow."""
    buf = _TICKETS.get(device)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _RETIRED.append(buf)
    buf = _TICKETS[device] = torch.zeros(max(n, MIN_TICKETS), dtype=torch.int32, device=device)
    return buf


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, max_seq_len: int, scale: float,
                 sliding_window: int | None = None, num_splits: int | None = None, pages_per_tile: int | None = None,
                 k_scale=None, v_scale=None, merge: str | None = None):
    """q: [B, Hq, D] (one query per sequence) -> [B, Hq, D]. k_scale / v_scale: an FP8 cache's 0-d scales.
    merge: "fused" or "kernel" (None: decode_merge(), the environment's).

    max_seq_len only bounds the number of splits; under a CUDA graph pass the
    largest length the graph will see (the grid is fixed at capture)."""
    _check_caches(q, k_cache, v_cache)
    b, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    g = hq // hkv
    pages = pages_per_tile or max(1, 64 // bs)
    if sliding_window is not None:
        max_seq_len = min(max_seq_len, sliding_window + bs * pages)
    if num_splits is None:
        num_splits = num_decode_splits(b, hkv, max_seq_len, q.device)
    merge = merge or decode_merge()
    if merge not in DECODE_MERGES:
        raise ValueError(f"paged_decode: merge must be one of {list(DECODE_MERGES)}, got {merge!r}")
    tickets = None
    if merge == "kernel":
        epilogue = "partials"
    elif num_splits == 1:
        epilogue = "direct"
    else:
        tickets = _tickets(q.device, b * hkv)
        epilogue = "partials" if tickets is None else "ticket"
    out = torch.empty_like(q)
    if epilogue == "direct":
        acc = ml = out  # unused
    else:
        acc = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, hq, num_splits, 2, dtype=torch.float32, device=q.device)
    d_pad = triton.next_power_of_2(d)
    s_pad = max(2, triton.next_power_of_2(num_splits))
    g_merge = triton.next_power_of_2(g)
    split_block = min(s_pad, max(2, MERGE_TILE // (g_merge * d_pad)))  # the same for both merges: the same sums
    ks, vs, scaled = _kv_scales(k_cache, k_scale, v_scale)
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, ml, out, tickets if tickets is not None else seq_lens,
        ks, vs, scale, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), out.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, D_PAD=d_pad,
        BLOCK_SIZE=bs, PAGES=pages, NUM_SPLITS=num_splits, USE_WINDOW=sliding_window is not None,
        PREC=_precision(q), KV_SCALED=scaled,
        EPILOGUE=epilogue, G_MERGE=g_merge, S_PAD=s_pad, SPLIT_BLOCK=split_block,
    )
    if epilogue == "partials":
        _decode_merge_kernel[(b, hq)](
            acc, ml, out,
            acc.stride(0), acc.stride(1), acc.stride(2),
            ml.stride(0), ml.stride(1), ml.stride(2),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, S_PAD=s_pad, SPLIT_BLOCK=split_block, D=d, D_PAD=d_pad,
        )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, work_ptr, ks_ptr, vs_ptr,
    scale, window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_tb,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr, USE_WINDOW: tl.constexpr,
    PREC: tl.constexpr, KV_SCALED: tl.constexpr,
):
    # One program per (query head, work item); an item is a (sequence, query tile) that has
    # queries (prefill_work), so no program is launched for nothing. The heads vary fastest:
    # the G heads of a KV head run side by side and read its pages once from memory.
    h = tl.program_id(0)
    item = tl.program_id(1)
    seq = tl.load(work_ptr + 2 * item)
    tile = tl.load(work_ptr + 2 * item + 1)
    kvh = h // G
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx0 = seq_len - q_len  # position of the first query
        i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        i_ok = i < q_len
        q_pos = ctx0 + i
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        q = tl.load(q_ptr + (q_start + i)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        if KV_SCALED:
            scale = scale * tl.load(ks_ptr)
        TILE: tl.constexpr = BLOCK_SIZE * PAGES
        hi = tl.minimum(seq_len, ctx0 + (tile + 1) * BLOCK_M)  # causal limit of this tile
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(0, ctx0 + tile * BLOCK_M - window + 1)
            lo = lo - lo % TILE
        for t0 in range(lo, hi, TILE):
            t = t0 + tl.arange(0, TILE)
            t_ok = t < hi
            page = tl.load(tables_ptr + seq * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0)
            off = t % BLOCK_SIZE
            k = tl.load(k_ptr + page[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(q_ptr.dtype.element_ty)
            s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
            visible = t_ok[None, :] & (t[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (t[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            v = tl.load(v_ptr + page[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(q_ptr.dtype.element_ty)
            m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, PREC)
        if KV_SCALED:
            acc = acc * tl.load(vs_ptr)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + i)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])


def prefill_block_m(q, block_size: int, block_m: int | None = None) -> int:
    """The prefill kernel's query tile on q's device (its config table), or block_m if given."""
    return block_m or _prefill_config(q, block_size)["block_m"]


def prefill_work(query_start_loc_cpu, block_m: int, skip_seqs=()) -> np.ndarray:
    """int32 [n, 2]: (sequence, query tile) for every tile of BLOCK_M queries the prefill kernel
    runs, sequences in skip_seqs left out (another kernel takes them)."""
    q_lens = np.diff(np.asarray(query_start_loc_cpu, dtype=np.int64))
    tiles = -(-q_lens // block_m)
    if len(skip_seqs):
        tiles[np.asarray(list(skip_seqs), dtype=np.int64)] = 0
    seqs = np.repeat(np.arange(len(q_lens), dtype=np.int64), tiles)
    first = np.repeat(np.cumsum(tiles) - tiles, tiles)
    return np.stack([seqs, np.arange(len(seqs), dtype=np.int64) - first], axis=1).astype(np.int32)


def paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len: int, scale: float,
                  sliding_window: int | None = None, block_m: int | None = None, pages_per_tile: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None, work=None, out=None,
                  k_scale=None, v_scale=None):
    """q: [T, Hq, D] flattened over sequences (query_start_loc [B+1]) -> [T, Hq, D].
    work: prefill_work's [n, 2] for this block_m on q's device (a step's plan, shared by its layers);
    None: every sequence, the list made here from query_start_loc (a device-to-host copy). Rows of
    sequences not in the work list are left untouched in `out`. k_scale / v_scale: an FP8 cache's
    0-d scales. max_query_len: unused (the work list sizes the grid); kept for the callers' symmetry."""
    _check_caches(q, k_cache, v_cache)
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    cfg = _prefill_config(q, bs)
    block_m = prefill_block_m(q, bs, block_m)
    pages = pages_per_tile or cfg["pages"]
    launch = {"num_warps": num_warps or cfg["num_warps"], "num_stages": num_stages or cfg["num_stages"]}
    out = torch.empty_like(q) if out is None else out
    if work is None:
        work = torch.from_numpy(prefill_work(query_start_loc.tolist(), block_m)).to(q.device)
    if work.shape[0] == 0:
        return out
    grid = (hq, work.shape[0])
    ks, vs, scaled = _kv_scales(k_cache, k_scale, v_scale)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, work,
        ks, vs, scale, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        G=hq // hkv, D=d, D_PAD=triton.next_power_of_2(d),
        BLOCK_M=block_m, BLOCK_SIZE=bs, PAGES=pages, USE_WINDOW=sliding_window is not None,
        PREC=_precision(q), KV_SCALED=scaled, **launch,
    )
    return out


# Launch shape of the prefill kernel per device kind; scripts/bench_attention.py
# sweeps the candidates on a GPU and prints the fastest.
PREFILL_CONFIGS = {
    "default": {"block_m": 64, "tile": 64, "num_warps": 4, "num_stages": 2},
    # bench_attention --sweep, 2026-11-24: 159 TFLOP/s vs 147 for the default (4096 causal, bf16).
    # 16-bit dtypes only: fp32 tiles of this shape need more shared memory than a block gets.
    ("NVIDIA H100 80GB HBM3", 2): {"block_m": 128, "tile": 128, "num_warps": 8, "num_stages": 3},
}


def _prefill_config(q, block_size: int) -> dict:
    return _config_for(torch.cuda.get_device_name(q.device) if q.is_cuda else "cpu", q.element_size(), block_size)


@functools.cache
def _config_for(device_name: str, element_size: int, block_size: int) -> dict:
    cfg = dict(PREFILL_CONFIGS["default"])
    cfg.update(PREFILL_CONFIGS.get((device_name, element_size), {}))
    cfg["pages"] = max(1, cfg.pop("tile") // block_size)
    return cfg
