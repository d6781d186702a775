"""The sampler: logits of the rows being sampled -> next tokens (+ logprobs).

The model runner builds one `SamplingBatch` per step (`SamplingBatch.build`)
and calls `Sampler()(logits, batch, generator)`. The tensor work lives in
`ziggurat.kernels.sampling`; this module decides what runs and draws the
randomness.

Order (vLLM v1): raw logprobs -> penalties -> min_tokens mask -> greedy argmax
-> temperature -> top-k / top-p / min-p -> softmax -> exponential race.
On GPUs (Triton) the last steps are one kernel: temperature (when no filter
needs it first) and the draw by Gumbel-max, which samples the same
distribution as the exponential race in one read of the logits
(kernels/sampling_triton.py); greedy rows of a mixed batch take the argmax
in the same pass.

Reproducibility: a seeded row's randomness comes from a stream keyed by
`mix_seed(seed, step)` (a torch generator on CPU, Philox in the kernel), so
its token depends only on its seed, its step and its own logits, never on
the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ziggurat.kernels.backend import use_triton
from ziggurat.kernels.sampling import (
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p_min_p,
    gumbel_sample,
    mask_tokens,
    sample,
)
from ziggurat.sampling_params import SamplingParams

__all__ = ["SamplingBatch", "SamplerOutput", "Sampler", "mix_seed", "SAMPLING_COLUMNS", "sampling_row", "plain_greedy",
           "PenaltyState"]

# The per-row parameters the sampler reads on the device, in column order (top_k is exact in fp32: k < 2^24).
SAMPLING_COLUMNS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "top_k")


def sampling_row(p: SamplingParams) -> list[float]:
    return [float(getattr(p, c)) for c in SAMPLING_COLUMNS]


_BITS = None


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, positions: torch.Tensor) -> None:
    """Structured outputs: logits[positions[i], t] = -inf where bit t of bitmask[i] is 0,
    in place on the logits' device (bitmask: int32 [k, ceil(V / 32)], as xgrammar fills it;
    the scheduler sizes it for the model's logits, padded vocabulary rows included)."""
    global _BITS
    vocab = logits.shape[-1]
    if bitmask.shape[-1] * 32 < vocab:
        raise ValueError(f"bitmask covers {bitmask.shape[-1] * 32} tokens, logits have {vocab}")
    if _BITS is None or _BITS.device != logits.device:
        _BITS = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> _BITS) & 1).bool().flatten(1)  # [k, 32 W]
    rows = logits.index_select(0, positions)
    logits.index_copy_(0, positions, rows.masked_fill(~allowed[:, :vocab], float("-inf")))


def plain_greedy(p: SamplingParams) -> bool:
    """Argmax alone: no per-row parameter is read."""
    return p.temperature == 0.0 and not p.needs_penalties

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(seed: int, step: int) -> int:
    """Deterministic 63-bit generator seed for (request seed, step)."""
    return _splitmix64(_splitmix64(seed & _M64) ^ (step & _M64)) >> 1


@dataclass
class SamplingBatch:
    """Per-step sampling tensors for the B rows being sampled. The per-row
    parameter vectors are None when every row is greedy without penalties."""

    temperature: torch.Tensor | None  # float32 [B]; 0 = greedy
    top_k: torch.Tensor | None  # int64 [B]; <= 0 or >= V = off
    top_p: torch.Tensor | None  # float32 [B]; 1 = off
    min_p: torch.Tensor | None  # float32 [B]; 0 = off
    presence: torch.Tensor | None  # float32 [B]
    frequency: torch.Tensor | None  # float32 [B]
    repetition: torch.Tensor | None  # float32 [B]
    is_greedy: torch.Tensor | None  # bool [B]
    prompt_mask: torch.Tensor | None  # bool [B, V]; None when no row uses penalties
    output_counts: torch.Tensor | None  # int32 [B, V]; None when no row uses penalties
    min_tokens_mask: torch.Tensor | None  # bool [B, V]; tokens forbidden this step
    seeds: list[int | None]
    steps: list[int]  # tokens generated so far, per row
    max_logprobs: int  # max k over rows wanting logprobs; -1 if none
    vocab_size: int
    # Host-side fast-path flags.
    all_greedy: bool
    all_random: bool
    needs_penalties: bool
    needs_temperature: bool  # some random row has temperature != 1
    needs_top_k: bool
    needs_top_p: bool
    needs_min_p: bool
    max_top_k: int  # largest effective k over random rows (V if some row has it off)
    seeded_rows: list[int]  # random (non-greedy) rows with a seed
    num_unseeded_random: int  # random rows without a seed

    @property
    def needs_filters(self) -> bool:
        return self.needs_top_k or self.needs_top_p or self.needs_min_p

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @staticmethod
    def build(
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        param_table: torch.Tensor | None = None,
        param_rows: torch.Tensor | None = None,
        penalty_tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "SamplingBatch":
        """param_table/param_rows: the parameters already on the device (a
        [rows, len(SAMPLING_COLUMNS)] table and each sampled row's index into
        it), gathered there instead of copied from `params`.
        penalty_tensors: (prompt mask, output counts), [B, V] each, already on
        the device (PenaltyState); then only the lengths of output_ids are read."""
        device = torch.device(device)
        V = vocab_size
        B = len(params)
        if not (len(prompt_ids) == len(output_ids) == B):
            raise ValueError("params, prompt_ids and output_ids must have the same length")

        def vec(vals, dtype):
            return torch.tensor(vals, dtype=dtype).to(device, non_blocking=True)

        greedy = [p.temperature == 0.0 for p in params]
        random_rows = [p for p, g in zip(params, greedy) if not g]
        k_eff = [p.top_k if 0 < p.top_k < V else V for p in random_rows]
        needs_penalties = any(p.needs_penalties for p in params)

        prompt_mask = output_counts = None
        if needs_penalties and penalty_tensors is not None:
            prompt_mask, output_counts = penalty_tensors
        elif needs_penalties:
            prompt_mask = torch.zeros(B, V, dtype=torch.bool, device=device)
            output_counts = torch.zeros(B, V, dtype=torch.int32, device=device)
            p_rows: list[int] = []
            p_cols: list[int] = []
            o_rows: list[int] = []
            o_cols: list[int] = []
            for i, p in enumerate(params):
                if not p.needs_penalties:
                    continue  # neutral penalties: this row's content is irrelevant
                p_rows.extend([i] * len(prompt_ids[i]))
                p_cols.extend(prompt_ids[i])
                o_rows.extend([i] * len(output_ids[i]))
                o_cols.extend(output_ids[i])
            if p_cols:
                r, c = _valid(p_rows, p_cols, V, device)
                prompt_mask[r, c] = True
            if o_cols:
                r, c = _valid(o_rows, o_cols, V, device)
                output_counts.index_put_((r, c), torch.ones_like(c, dtype=torch.int32), accumulate=True)

        min_tokens_mask = None
        m_rows: list[int] = []
        m_cols: list[int] = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_tokens:
                banned = set(p.stop_token_ids or ())
                if not p.ignore_eos:
                    banned.update(p._eos_token_ids)
                m_rows.extend([i] * len(banned))
                m_cols.extend(banned)
        if m_cols:
            min_tokens_mask = torch.zeros(B, V, dtype=torch.bool, device=device)
            r, c = _valid(m_rows, m_cols, V, device)
            min_tokens_mask[r, c] = True

        lps = [p.logprobs for p in params if p.logprobs is not None]
        all_greedy = all(greedy)
        if all_greedy and not needs_penalties:
            vecs = [None] * 7  # argmax alone: no per-row parameter is read
        else:
            if param_rows is not None:
                dev = param_table.index_select(0, param_rows).t().contiguous()  # each column contiguous
            else:  # one host->device copy for all per-row parameters
                host = torch.tensor([sampling_row(p) for p in params], dtype=torch.float32)
                dev = host.t().contiguous().to(device, non_blocking=True)
            vecs = [dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6].long()]
        temperature, top_p, min_p, presence, frequency, repetition, top_k = vecs
        return SamplingBatch(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            is_greedy=None if temperature is None else temperature == 0.0,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            min_tokens_mask=min_tokens_mask,
            seeds=[p.seed for p in params],
            steps=[len(o) for o in output_ids],
            max_logprobs=max(lps) if lps else -1,
            vocab_size=V,
            all_greedy=all_greedy,
            all_random=not any(greedy),
            needs_penalties=needs_penalties,
            needs_temperature=any(p.temperature != 1.0 for p in random_rows),
            needs_top_k=any(k < V for k in k_eff),
            needs_top_p=any(p.top_p < 1.0 for p in random_rows),
            needs_min_p=any(p.min_p > 0.0 for p in random_rows),
            max_top_k=max(k_eff) if k_eff else V,
            seeded_rows=[i for i, p in enumerate(params) if not greedy[i] and p.seed is not None],
            num_unseeded_random=sum(1 for p in random_rows if p.seed is None),
        )


def _valid(rows: list[int], cols: list[int], V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors on device, dropping token ids outside [0, V)."""
    r = torch.tensor(rows, dtype=torch.long)
    c = torch.tensor(cols, dtype=torch.long)
    ok = (c >= 0) & (c < V)
    if not bool(ok.all()):
        r, c = r[ok], c[ok]
    return r.to(device, non_blocking=True), c.to(device, non_blocking=True)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B]
    # Present iff batch.max_logprobs >= 0; all from log_softmax of the raw logits.
    logprobs: torch.Tensor | None  # float32 [B], logprob of the sampled token
    topk_ids: torch.Tensor | None  # int64 [B, K], K = max_logprobs (may be 0)
    topk_logprobs: torch.Tensor | None  # float32 [B, K]
    ranks: torch.Tensor | None  # int64 [B], 1 = most likely


class Sampler(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self._draws = 0  # steps with random rows so far: keys unseeded rows' Philox streams

    def forward(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        kernel = not batch.all_greedy and use_triton(logits)
        edited = batch.needs_penalties or batch.min_tokens_mask is not None or batch.needs_filters
        if not kernel or edited or batch.max_logprobs >= 0:
            logits = logits.float()  # else the kernel reads the model's logits as they are (bf16)
        raw_logprobs = logits.log_softmax(dim=-1) if batch.max_logprobs >= 0 else None

        if batch.needs_penalties:
            logits = apply_penalties(
                logits,
                batch.prompt_mask,
                batch.output_counts,
                batch.presence,
                batch.frequency,
                batch.repetition,
            )
        if batch.min_tokens_mask is not None:
            logits = mask_tokens(logits, batch.min_tokens_mask)

        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        elif kernel:
            # Temperature and the draw in one Triton pass (Gumbel-max; greedy
            # rows take the argmax). Filters (which need the scaled logits)
            # only mask entries: the kernel always scales a row the same way,
            # so a seeded row's draw never depends on what else is in the batch.
            if batch.needs_filters:
                scaled = apply_temperature(logits, batch.temperature) if batch.needs_temperature else logits
                logits = logits.masked_fill(self._filter(scaled, batch) == float("-inf"), float("-inf"))
            token_ids = gumbel_sample(logits, batch.temperature, *self._row_seeds(batch, logits.device))
        else:
            greedy_ids = None if batch.all_random else logits.argmax(dim=-1)
            if batch.needs_temperature:
                logits = apply_temperature(logits, batch.temperature)
            if batch.needs_filters:
                logits = self._filter(logits, batch)
            probs = logits.softmax(dim=-1)
            q = self._draw_q(probs, batch, generator)
            token_ids = sample(probs, q)
            if greedy_ids is not None:
                token_ids = torch.where(batch.is_greedy, greedy_ids, token_ids)

        out = SamplerOutput(token_ids, None, None, None, None)
        if raw_logprobs is not None:
            tok_lp = raw_logprobs.gather(1, token_ids.unsqueeze(1))
            out.logprobs = tok_lp.squeeze(1)
            # Rank as vLLM: number of tokens at least as likely (itself included).
            out.ranks = (raw_logprobs >= tok_lp).sum(dim=-1)
            k = batch.max_logprobs
            top = raw_logprobs.topk(k, dim=-1)
            out.topk_logprobs, out.topk_ids = top.values, top.indices
        return out

    @staticmethod
    def _filter(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Top-k / top-p / min-p for the rows that ask (filtered entries -inf)."""
        return apply_top_k_top_p_min_p(
            logits,
            batch.top_k if batch.needs_top_k else None,
            batch.top_p if batch.needs_top_p else None,
            batch.min_p if batch.needs_min_p else None,
            max_top_k=batch.max_top_k,
        )

    def _row_seeds(self, batch: SamplingBatch, device) -> tuple[int, torch.Tensor | None]:
        """(base, row keys): unseeded row i draws from Philox key base + i, a
        fresh base per call; a seeded random row from mix_seed(seed, step)
        (row keys, int64 [B], -1 elsewhere; None when no row is seeded)."""
        self._draws += 1
        base = (mix_seed(self.seed, self._draws) | (1 << 40)) & ((1 << 62) - 1)  # always an int64 kernel argument
        if not batch.seeded_rows:
            return base, None
        keys = [-1] * batch.batch_size
        for i in batch.seeded_rows:
            keys[i] = mix_seed(batch.seeds[i], batch.steps[i])
        return base, torch.tensor(keys, dtype=torch.int64).to(device, non_blocking=True)

    @staticmethod
    def _draw_q(
        probs: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Exp(1) noise [B, V]: batched from `generator` for unseeded rows,
        from a fresh (seed, step) generator for each seeded random row."""
        V = probs.shape[1]
        if batch.num_unseeded_random > 0:
            q = torch.empty_like(probs).exponential_(generator=generator)
        else:
            q = torch.ones_like(probs)
        for i in batch.seeded_rows:
            g = torch.Generator(device=probs.device)
            g.manual_seed(mix_seed(batch.seeds[i], batch.steps[i]))
            q[i] = torch.empty(V, dtype=probs.dtype, device=probs.device).exponential_(generator=g)
        return q


class PenaltyState:
    """Prompt-token masks and output-token counts of the requests that use
    penalties, one entry (a row of its two tables) each, on the device. An entry is written once when its
    request arrives (prompt ids, and output ids when it resumes after
    preemption); each step's sampled tokens bump the counts on the GPU
    (`bump`), so penalties never rebuild [B, V] tensors from token lists and
    never wait for a token still in flight."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.vocab, self.device = vocab_size, torch.device(device)
        self.prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=self.device)
        self.free: list[int] = []
        self._init: dict[int, tuple[list[int], list[int]]] = {}  # entry -> (prompt ids, output ids) to write

    def add(self, prompt_ids, output_ids) -> int:
        if not self.free:
            n = self.prompt.shape[0]
            grow = max(4, n)
            self.prompt = torch.cat([self.prompt, self.prompt.new_zeros(grow, self.vocab)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab)])
            self.free.extend(range(n + grow - 1, n - 1, -1))
        entry = self.free.pop()
        self._init[entry] = (list(prompt_ids), list(output_ids))  # a reused entry's last writer wins
        return entry

    def release(self, entry: int) -> None:
        self.free.append(entry)

    def flush(self) -> None:
        """Write the entries added since the last flush (one copy of their ids)."""
        if not self._init:
            return
        init, self._init = self._init, {}
        entries = torch.tensor(list(init), dtype=torch.long).to(self.device, non_blocking=True)
        self.prompt[entries] = False
        self.counts[entries] = 0
        for table, which in ((self.prompt, 0), (self.counts, 1)):
            rows = [s for s, ids in init.items() for t in ids[which] if 0 <= t < self.vocab]
            cols = [t for ids in init.values() for t in ids[which] if 0 <= t < self.vocab]
            if not cols:
                continue
            r = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
            c = torch.tensor(cols, dtype=torch.long).to(self.device, non_blocking=True)
            if which == 0:
                table[r, c] = True
            else:
                table.index_put_((r, c), torch.ones_like(c, dtype=torch.int32), accumulate=True)

    def gather(self, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt mask bool [B, V], output counts int32 [B, V]) for the given entries."""
        self.flush()
        return self.prompt.index_select(0, entries), self.counts.index_select(0, entries)

    def bump(self, entries: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens just sampled for these entries (on the device, in stream order)."""
        self.flush()  # a entry's initial write must come first
        self.counts.index_put_((entries, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
