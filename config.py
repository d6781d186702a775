"""EngineConfig: every knob of one replica, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str | None = None  # None: the checkpoint's torch_dtype
    tensor_parallel_size: int = 1
    device: str | None = None  # None: cuda if available, else cpu
    block_size: int = 16
    # KV cache size. GPU: sized from free memory (gpu_memory_utilization) unless
    # num_kv_blocks is given. CPU: num_kv_blocks, else kv_cache_bytes.
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # the per-step token budget (chunked prefill)
    enable_prefix_caching: bool = True
    # Schedule step N+1 while step N runs (its sampled tokens count as pending).
    async_scheduling: bool = True
    # CUDA graphs for decode steps of up to cuda_graph_max_batch sequences
    # (captured at start-up); enforce_eager turns them off.
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ConfigError(f"model: directory {self.model!r} does not exist")
        for name in ("tensor_parallel_size", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "cuda_graph_max_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size: must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks: must be positive, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len: must be at least 2, got {self.max_model_len}")
