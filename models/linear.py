"""Tensor-parallel linear layers.

Column-parallel layers split the output features across ranks (no
communication); row-parallel layers split the input features and all-reduce
the partial sums. A column layer followed by a row layer (attention's
qkv -> o, the MLP's gate_up -> down) costs one all-reduce.

Each parameter carries `weight_loader(param, src, shard_id)`, which reads
only this rank's slice from the checkpoint (see models/loader.py), and
`shard_ids`, the checkpoint tensors merged into it (for the missing-tensor
check).

With LoRA enabled, a layer's `lora` holds its adapter slots (models/lora.py)
and forward(x, lora_batch) adds each token's adapter delta to the base output
(a row-parallel layer adds its partial delta before the all-reduce, so one
collective sums both).
"""

from __future__ import annotations

import torch
from torch import nn

from ziggurat.kernels.activation import silu_and_mul
from ziggurat.kernels.matmul import linear
from ziggurat.topology.distributed import all_reduce, shard_range, tp


def _param(shape, dtype, loader, shard_ids=(None,)) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    p.shard_ids = shard_ids
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), W's rows (output features) split across ranks.

    `output_sizes` lists the checkpoint tensors stacked in the output dim
    (one entry for a plain layer, [gate, up] for a merged MLP); each is split
    across ranks separately so rank r holds [gate_r; up_r].
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype, shard_ids=(None,)):
        super().__init__()
        g = tp()
        self.tp_rank, self.tp_size = g.rank, g.size
        self.in_features = in_features
        self.full_sizes = list(output_sizes)
        self.local_sizes = [shard_range(s, 0, g.size, "output size")[1] for s in output_sizes]
        out_local = sum(self.local_sizes)
        self.shard_index = {sid: i for i, sid in enumerate(shard_ids)}
        self.weight = _param((out_local, in_features), dtype, self._load, shard_ids)
        self.bias = _param((out_local,), dtype, self._load, shard_ids) if bias else None
        self.lora = None  # LayerSlots (models/lora.py) when the engine serves adapters
        self.weight_scale = self.input_scale = None  # FP8 weights' scales (models/quantization.py)

    def _slice_for(self, shard_id) -> tuple[int, int, int, int]:
        """(offset in local param, local rows, start row in checkpoint tensor, full rows)."""
        i = self.shard_index[shard_id]
        local = self.local_sizes[i]
        return sum(self.local_sizes[:i]), local, self.tp_rank * local, self.full_sizes[i]

    def _load(self, param: nn.Parameter, src, shard_id=None) -> None:
        offset, local, start, full = self._slice_for(shard_id)
        expected = (full, self.in_features) if param.dim() == 2 else (full,)
        src.expect_shape(expected)
        param.data[offset : offset + local].copy_(src.read(0, start, local))

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, self.weight_scale, self.input_scale)
        if lora is not None and self.lora is not None:
            self.lora.apply(y, x, lora)
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_proj and up_proj as one matmul."""

    def __init__(self, in_features: int, output_size: int, bias: bool, dtype: torch.dtype):
        super().__init__(in_features, [output_size, output_size], bias, dtype, shard_ids=(0, 1))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one matmul; heads split across ranks.

    With fewer KV heads than ranks, KV heads are replicated: rank r holds KV
    head r // (tp_size // num_kv_heads).
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, dtype: torch.dtype):
        g = tp()
        if num_heads % g.size:
            raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by tensor_parallel_size ({g.size})")
        if num_kv_heads >= g.size and num_kv_heads % g.size or num_kv_heads < g.size and g.size % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads ({num_kv_heads}) and tensor_parallel_size ({g.size}) must divide one another"
            )
        self.head_dim = head_dim
        self.num_heads = num_heads // g.size
        self.num_kv_heads = max(1, num_kv_heads // g.size)
        self.total_kv_heads = num_kv_heads
        super().__init__(
            hidden,
            [num_heads * head_dim, self.num_kv_heads * head_dim * g.size, self.num_kv_heads * head_dim * g.size],
            bias,
            dtype,
            shard_ids=("q", "k", "v"),
        )

    def _slice_for(self, shard_id):
        if shard_id == "q":
            return super()._slice_for(shard_id)
        kv_local = self.num_kv_heads * self.head_dim
        offset = self.local_sizes[0] + (kv_local if shard_id == "v" else 0)
        replicas = max(1, self.tp_size // self.total_kv_heads)
        start = (self.tp_rank // replicas) * kv_local
        return offset, kv_local, start, self.total_kv_heads * self.head_dim

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b, W's columns (input features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        g = tp()
        self.tp_rank, self.tp_size = g.rank, g.size
        self.in_full, self.out_features = in_features, out_features
        _, self.in_local = shard_range(in_features, 0, g.size, "input size")
        self.weight = _param((out_features, self.in_local), dtype, self._load_weight)
        self.bias = _param((out_features,), dtype, self._load_bias) if bias else None
        self.lora = None  # LayerSlots (models/lora.py) when the engine serves adapters
        self.weight_scale = self.input_scale = None  # FP8 weights' scales (models/quantization.py)

    def _load_weight(self, param, src, shard_id=None) -> None:
        src.expect_shape((self.out_features, self.in_full))
        param.data.copy_(src.read(1, self.tp_rank * self.in_local, self.in_local))

    def _load_bias(self, param, src, shard_id=None) -> None:
        src.expect_shape((self.out_features,))
        param.data.copy_(src.read())

    def forward(self, x: torch.Tensor, lora=None, gated: bool = False) -> torch.Tensor:
        """gated: x is a merged gate_up output [T, 2 * in] and the input is silu_and_mul(x) (kernels/matmul.py)."""
        if gated and lora is not None and self.lora is not None:
            x, gated = silu_and_mul(x), False  # the adapter's delta reads the activation itself
        y = linear(x, self.weight, None, self.weight_scale, self.input_scale, gated)
        if lora is not None and self.lora is not None:
            self.lora.apply(y, x, lora)  # x_r A_r^T B^T: summed over ranks with the base output
        y = all_reduce(y)
        return y + self.bias if self.bias is not None else y
