"""Triton sampling: temperature and the random draw of every row in one pass over the vocabulary.

Gumbel-max: argmax_i(x_i / T - log(-log U_i)) with U_i uniform is a sample from
softmax(x / T), the same distribution as the exponential race of the torch
path (argmax p_i / E_i, E_i ~ Exp(1), since -log E_i is Gumbel), with no
softmax, no normaliser and no [B, V] noise tensor in memory: one read of the
logits. U comes from Philox keyed by the row's seed and the token id, so a
seeded row's draw depends only on (its seed, its step, its logits). Rows with
T = 0 take the plain argmax. Filtered entries (-inf) are never drawn.

Program (row, split) scans one slice of the row; the splits' winners are
reduced with an argmax over [B, splits] (lowest index wins ties, as torch's
argmax does).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_slice(logits_ptr, row_off, c, end, u, greedy, inv_t, best, best_i):
    ok = c < end
    x = tl.load(logits_ptr + row_off + c, mask=ok, other=float("-inf")).to(tl.float32)
    g = -tl.log(-tl.log(u))  # u = 0 gives -inf: that token loses this draw
    s = tl.where(greedy, x, x * inv_t + g)
    s = tl.where(ok & (x > float("-inf")), s, float("-inf"))
    m = tl.max(s, 0)
    i = tl.argmax(s, 0).to(tl.int64) + tl.min(c, 0)
    better = m > best
    return tl.where(better, m, best), tl.where(better, i, best_i)


@triton.jit(do_not_specialize=["base_seed"])  # a new key every step must not mean a new compile
def _gumbel_argmax_kernel(logits_ptr, temp_ptr, seed_ptr, score_ptr, idx_ptr, stride_l, V, split_len, base_seed,
                          HAS_ROW_SEEDS: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    t = tl.load(temp_ptr + row).to(tl.float32)
    # A row's Philox key: its own seed where given (>= 0), else base + row.
    seed = base_seed + row
    if HAS_ROW_SEEDS:
        s = tl.load(seed_ptr + row)
        seed = tl.where(s >= 0, s, seed)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    start = sp * split_len
    end = tl.minimum(start + split_len, V)
    row_off = row.to(tl.int64) * stride_l
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64)
    Q: tl.constexpr = BLOCK // 4
    k = tl.arange(0, Q)
    for c0 in range(start, end, BLOCK):
        # One Philox call gives four uniforms; token c0 + j*Q + k takes lane j
        # of counter c0/4 + k (c0 is a multiple of BLOCK in every split layout).
        u0, u1, u2, u3 = tl.rand4x(seed, c0 // 4 + k)
        best, best_i = _gumbel_slice(logits_ptr, row_off, c0 + k, end, u0, greedy, inv_t, best, best_i)
        best, best_i = _gumbel_slice(logits_ptr, row_off, c0 + Q + k, end, u1, greedy, inv_t, best, best_i)
        best, best_i = _gumbel_slice(logits_ptr, row_off, c0 + 2 * Q + k, end, u2, greedy, inv_t, best, best_i)
        best, best_i = _gumbel_slice(logits_ptr, row_off, c0 + 3 * Q + k, end, u3, greedy, inv_t, best, best_i)
    tl.store(score_ptr + row * SPLITS + sp, best)
    tl.store(idx_ptr + row * SPLITS + sp, best_i)


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, base_seed: int,
                  row_seeds: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype, rows contiguous), temperature [B] (0 = greedy),
    base_seed: row i draws from Philox key base_seed + i, unless row_seeds
    (int64 [B]) gives it a key >= 0. Returns token ids int64 [B]."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    temperature = temperature.contiguous()  # the kernel reads element `row`
    if row_seeds is not None:
        row_seeds = row_seeds.contiguous()
    block = 2048
    if splits is None:
        sms = _sm_count(logits.device.index) if logits.is_cuda else 4
        splits = max(1, min(triton.cdiv(v, 8 * block), triton.cdiv(2 * sms, max(b, 1))))
    split_len = triton.cdiv(triton.cdiv(v, splits), block) * block
    splits = triton.cdiv(v, split_len)
    score = torch.empty(b, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(b, splits, dtype=torch.int64, device=logits.device)
    if b:
        _gumbel_argmax_kernel[(b, splits)](logits, temperature, row_seeds if row_seeds is not None else idx,
                                           score, idx, logits.stride(0), v, split_len, base_seed,
                                           HAS_ROW_SEEDS=row_seeds is not None, SPLITS=splits, BLOCK=block)
    if splits == 1:
        return idx[:, 0]
    return idx.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)
