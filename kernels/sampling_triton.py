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

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, temp_ptr, seed_ptr, score_ptr, idx_ptr, stride_l, V, split_len,
                          SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    t = tl.load(temp_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    start = sp * split_len
    end = tl.minimum(start + split_len, V)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64)
    for c0 in range(start, end, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < end
        x = tl.load(logits_ptr + row * stride_l + c, mask=ok, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, c)
        g = -tl.log(-tl.log(u))  # u = 0 gives -inf: that token loses this draw
        s = tl.where(greedy, x, x * inv_t + g)
        s = tl.where(ok & (x > float("-inf")), s, float("-inf"))
        m = tl.max(s, 0)
        i = tl.argmax(s, 0).to(tl.int64) + c0
        better = m > best
        best_i = tl.where(better, i, best_i)
        best = tl.where(better, m, best)
    tl.store(score_ptr + row * SPLITS + sp, best)
    tl.store(idx_ptr + row * SPLITS + sp, best_i)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  splits: int | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype, rows contiguous), temperature [B] (0 = greedy),
    seeds int64 [B] -> token ids int64 [B]."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = 2048
    if splits is None:
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 4
        splits = max(1, min(triton.cdiv(v, 8 * block), triton.cdiv(2 * sms, max(b, 1))))
    split_len = triton.cdiv(triton.cdiv(v, splits), block) * block
    splits = triton.cdiv(v, split_len)
    score = torch.empty(b, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(b, splits, dtype=torch.int64, device=logits.device)
    if b:
        _gumbel_argmax_kernel[(b, splits)](logits, temperature, seeds, score, idx, logits.stride(0), v, split_len,
                                           SPLITS=splits, BLOCK=block)
    if splits == 1:
        return idx[:, 0]
    return idx.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)
