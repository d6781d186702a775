"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split into tp_size contiguous ranges (padded so every rank
holds the same number of rows). The embedding zeroes rows for ids outside the
rank's range and all-reduces; the LM head computes its range's logits and
rank 0 gathers the full row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ziggurat.kernels.matmul import linear
from ziggurat.topology.distributed import all_reduce, gather_last_dim_to_first_rank, tp


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        g = tp()
        self.tp_rank, self.tp_size = g.rank, g.size
        self.vocab_size, self.hidden = vocab_size, hidden
        self.rows = (vocab_size + g.size - 1) // g.size
        self.start = g.rank * self.rows
        self.end = min(vocab_size, self.start + self.rows)
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load
        self.weight.shard_ids = (None,)

    def _load(self, param, src, shard_id=None) -> None:
        src.expect_shape((self.vocab_size, self.hidden))
        n = self.end - self.start
        param.data[:n].copy_(src.read(0, self.start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        in_range = (ids >= self.start) & (ids < self.end)
        out = F.embedding((ids - self.start) * in_range, self.weight)
        out = out * in_range.unsqueeze(-1).to(out.dtype)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0 (None elsewhere)."""
        local = linear(hidden, self.weight)
        full = gather_last_dim_to_first_rank(local)
        return None if full is None else full[..., : self.vocab_size]
