"""Reference (pure torch) sampling ops.

Every function here is batched, tensor-in / tensor-out, never modifies its
inputs and never syncs with the host (no .item()/.tolist()), so a Triton
version can replace any of them behind the same signature. Logits are float32
[B, V]; per-row parameters are [B] tensors on the logits' device.

Semantics follow vLLM (penalties) and Hugging Face's logits warpers (top-k,
top-p, min-p), which vLLM also matches.
"""

from __future__ import annotations

import torch

from ziggurat.kernels.backend import use_triton

__all__ = [
    "gumbel_sample",
    "apply_penalties",
    "apply_temperature",
    "apply_top_k_top_p_min_p",
    "mask_tokens",
    "sample",
]


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties.

    prompt_mask: bool [B, V], token occurs in the prompt.
    output_counts: int [B, V], occurrences of the token in the generated text.
    presence, frequency, repetition: float [B] (0, 0, 1 are neutral).

    Repetition applies to tokens seen in the prompt or the output: a positive
    logit is divided by the penalty, any other multiplied by it. Then
    logits -= frequency * count and logits -= presence * (count > 0).
    """
    output_mask = output_counts > 0
    rep = repetition.to(logits.dtype).unsqueeze(1)
    seen = prompt_mask | output_mask
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - frequency.to(logits.dtype).unsqueeze(1) * output_counts.to(logits.dtype)
    logits = logits - presence.to(logits.dtype).unsqueeze(1) * output_mask.to(logits.dtype)
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; temperature 0 (greedy) counts as 1."""
    t = temperature.to(logits.dtype)
    t = torch.where(t > 0, t, torch.ones_like(t))
    return logits / t.unsqueeze(1)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Top-k, then top-p, then min-p; filtered entries become -inf.

    top_k: int [B], <= 0 or >= V disables it for that row. top_p: float [B],
    1.0 disables it. min_p: float [B], 0 disables it. Passing None for any
    of them skips that filter for the whole batch (a host-side fast path).

    Ties with the k-th largest logit are kept (as HF's TopKLogitsWarper);
    top-p keeps the smallest set of most likely tokens whose cumulative
    probability reaches top_p, at least one token (HF's TopPLogitsWarper on
    the top-k-filtered logits); min-p drops tokens whose probability is below
    min_p times the largest probability (HF's MinPLogitsWarper).

    max_top_k: optional host-side hint, an upper bound on the effective k of
    every row (V when some row has top-k off). With top_p None and
    max_top_k < V it uses torch.topk instead of a full sort.
    """
    vocab = logits.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)

    k_eff = None
    if top_k is not None:
        k = top_k.to(torch.long)
        k_eff = torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k)

    if top_p is not None:
        # One ascending sort serves both top-k and top-p.
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        if k_eff is not None:
            # k-th largest sits at ascending position V - k.
            kth = sorted_logits.gather(1, (vocab - k_eff).unsqueeze(1))
            sorted_logits = torch.where(sorted_logits < kth, neg_inf, sorted_logits)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # 1 - p in float64 then rounded, as HF's Python-float threshold.
        remove = cum <= (1 - top_p.double()).to(logits.dtype).unsqueeze(1)
        remove[:, -1] = False  # always keep the most likely token
        sorted_logits = torch.where(remove, neg_inf, sorted_logits)
        logits = torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
    elif k_eff is not None:
        if max_top_k is not None and max_top_k < vocab:
            vals = torch.topk(logits, max_top_k, dim=-1).values  # descending
            kth = vals.gather(1, (k_eff.clamp(max=max_top_k) - 1).unsqueeze(1))
        else:
            sorted_logits = torch.sort(logits, dim=-1, descending=False).values
            kth = sorted_logits.gather(1, (vocab - k_eff).unsqueeze(1))
        logits = torch.where(logits < kth, neg_inf, logits)

    if min_p is not None:
        probs = logits.softmax(dim=-1)
        top = probs.amax(dim=-1, keepdim=True)
        remove = probs < min_p.to(logits.dtype).unsqueeze(1) * top
        # The most likely token always has probs == top >= min_p * top, so
        # at least one token survives without an explicit keep.
        logits = torch.where(remove, neg_inf, logits)
    return logits


def mask_tokens(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set logits to -inf where mask (bool [B, V]) is True (min_tokens)."""
    return logits.masked_fill(mask, float("-inf"))


def sample(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax(probs / q) with q ~ Exp(1) [B, V], given.

    P(argmax = i) = probs[i] / sum(probs), so this samples from probs while
    the caller decides the randomness. Returns int64 [B].
    """
    tiny = torch.finfo(q.dtype).tiny
    return (probs / q.clamp_min(tiny)).argmax(dim=-1)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, base_seed: int,
                  row_seeds: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature + draw in one pass (Gumbel-max): a sample of softmax(logits / T)
    per row, argmax where T = 0. Row i's randomness is keyed by base_seed + i,
    or by row_seeds[i] where that is >= 0 (int64 [B]); a row's draw depends
    only on its key and its logits. Triton on GPUs (kernels/sampling_triton.py);
    gumbel_sample_ref has the same distribution (not the same random stream)."""
    if use_triton(logits):
        from ziggurat.kernels.sampling_triton import gumbel_sample as triton_gumbel_sample

        return triton_gumbel_sample(logits, temperature, base_seed, row_seeds)
    return gumbel_sample_ref(logits, temperature, base_seed, row_seeds)


def gumbel_sample_ref(logits: torch.Tensor, temperature: torch.Tensor, base_seed: int,
                      row_seeds: torch.Tensor | None = None) -> torch.Tensor:
    x = logits.float()
    keys = row_seeds.tolist() if row_seeds is not None else [-1] * x.shape[0]
    u = torch.empty_like(x)
    for i, k in enumerate(keys):
        g = torch.Generator(device=x.device).manual_seed((k if k >= 0 else base_seed + i) & ((1 << 63) - 1))
        u[i] = torch.rand(x.shape[1], generator=g, device=x.device, dtype=x.dtype)
    t = temperature.float().unsqueeze(1)
    greedy = t <= 0
    scores = torch.where(greedy, x, x / torch.where(greedy, torch.ones_like(t), t) - torch.log(-torch.log(u)))
    scores = torch.where(x == float("-inf"), x, scores)
    return scores.argmax(dim=-1)
