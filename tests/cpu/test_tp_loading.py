"""Tensor-parallel weight loading reads each rank's slice, never the whole tensor.

Builds the model as rank r of a 2-way (and 4-way) TP group without a process
group (no collective runs: only construction and loading), loads a real
checkpoint, and checks (1) every parameter equals the slice of the full
tensor that rank should hold and (2) merged or split parameters were read
through narrowed reads.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ziggurat.models import loader
from ziggurat.models.config import ModelConfig
from ziggurat.models.registry import model_class
from ziggurat.topology import distributed


@pytest.fixture
def as_rank(monkeypatch):
    def set_rank(rank, size):
        monkeypatch.setattr(distributed, "_TP", distributed.TPGroup(rank=rank, size=size, group=None))

    return set_rank


def full_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("size,kv_heads", [(2, 2), (4, 2), (2, 1)])
def test_each_rank_holds_its_slice(model_factory, as_rank, monkeypatch, size, kv_heads):
    path = model_factory("qwen2", num_kv_heads=kv_heads)  # qkv biases exercise bias slicing too
    cfg = ModelConfig.from_dir(path)
    full = full_tensors(path)
    reads = []
    orig = loader.TensorSource.read

    def spy(self, dim=None, start=0, length=None):
        reads.append((self.name, dim, self.shape))
        return orig(self, dim, start, length)

    monkeypatch.setattr(loader.TensorSource, "read", spy)
    hd = cfg.head_dim
    for rank in range(size):
        as_rank(rank, size)
        reads.clear()
        model = model_class(cfg)(cfg)
        loader.load_weights(model, path)
        p = dict(model.named_parameters())
        q_rows = cfg.num_heads * hd // size
        kv_rank = rank // max(1, size // kv_heads)
        kv_rows = max(1, kv_heads // size) * hd
        w = full["model.layers.0.self_attn.q_proj.weight"]
        qkv = p["layers.0.self_attn.qkv_proj.weight"]
        assert torch.equal(qkv[:q_rows], w[rank * q_rows : (rank + 1) * q_rows])
        k = full["model.layers.0.self_attn.k_proj.weight"]
        assert torch.equal(qkv[q_rows : q_rows + kv_rows], k[kv_rank * kv_rows : (kv_rank + 1) * kv_rows])
        bias = full["model.layers.0.self_attn.v_proj.bias"]
        assert torch.equal(p["layers.0.self_attn.qkv_proj.bias"][q_rows + kv_rows :],
                           bias[kv_rank * kv_rows : (kv_rank + 1) * kv_rows])
        inter = cfg.intermediate_size // size
        gate_up = p["layers.1.mlp.gate_up_proj.weight"]
        assert torch.equal(gate_up[inter:], full["model.layers.1.mlp.up_proj.weight"][rank * inter : (rank + 1) * inter])
        down = full["model.layers.1.mlp.down_proj.weight"]
        assert torch.equal(p["layers.1.mlp.down_proj.weight"], down[:, rank * inter : (rank + 1) * inter])
        o = full["model.layers.0.self_attn.o_proj.weight"]
        assert torch.equal(p["layers.0.self_attn.o_proj.weight"], o[:, rank * q_rows : (rank + 1) * q_rows])
        rows = (cfg.vocab_size + size - 1) // size
        emb = full["model.embed_tokens.weight"][rank * rows : (rank + 1) * rows]
        assert torch.equal(p["embed_tokens.weight"][: len(emb)], emb)
        # Every sharded tensor was read narrowed (dim given); only replicated
        # ones (norms, the o/down biases) are read whole.
        whole = {name for name, dim, _ in reads if dim is None}
        assert all("norm" in n or n.endswith(("o_proj.bias", "down_proj.bias")) for n in whole), whole
        assert any(dim is not None for _, dim, _ in reads)
