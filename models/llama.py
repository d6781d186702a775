"""The Llama-family decoder: Llama (incl. Llama 3 RoPE scaling), Mistral, Qwen2, Qwen3.

All four are pre-norm decoders with RoPE, grouped-query attention and a
SwiGLU MLP; ModelConfig's flags carry their differences (q/k/v biases,
Qwen3's per-head q/k RMSNorm, sliding windows). The code reads like
single-GPU code: tensor parallelism lives inside the layers.

Input is a flat batch of T tokens from any number of sequences; positions
and the AttentionMetadata say which sequence each token belongs to.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ziggurat.kernels.attention import AttentionMetadata
from ziggurat.models.attention import PagedAttention
from ziggurat.models.config import ModelConfig
from ziggurat.models.embedding import ParallelLMHead, VocabParallelEmbedding
from ziggurat.models.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ziggurat.models.norm import RMSNorm
from ziggurat.models.quantization import checkpoint_name, prepare_model
from ziggurat.models.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        dt = cfg.dtype
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, dt)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_bias, dt)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt) if cfg.qk_norm else None
        self.heads, self.kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        # The attention layer rotates q/k as it stores the KV (one fused kernel).
        self.attn = PagedAttention(self.heads, self.kv_heads, cfg.head_dim, cfg.sliding_windows[layer], rotary)

    def forward(self, positions, x, meta: AttentionMetadata, lora=None):
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x, lora))
        q = q.reshape(t, self.heads, self.head_dim)
        k = k.reshape(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(positions, q, k, v, meta)
        return self.o_proj(out, lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, cfg.dtype)

    def forward(self, x, lora=None):
        # silu(gate) * up is the down projection's to apply: at decode it is the GEMV's
        # prologue (one launch fewer per layer), else silu_and_mul first (kernels/matmul.py).
        return self.down_proj(self.gate_up_proj(x, lora), lora, gated=True)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = Attention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = MLP(cfg)

    def forward(self, positions, x, residual, meta, lora=None):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta, lora)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, lora), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint sub-name -> (our merged parameter, shard id)
    _MERGED = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    _MERGED_RE = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")
    # LoRA: our layer -> the PEFT modules fused into it, with their shard ids (models/lora.py)
    _LORA = {
        "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
        "o_proj": (("o_proj", None),),
        "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
        "down_proj": (("down_proj", None),),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, cfg.dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = rotary
        prepare_model(self, cfg.quantization, cfg.kv_cache_dtype)  # FP8 weights / KV scales, if any

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora=None) -> torch.Tensor:
        """Returns final hidden states [T, hidden]. lora: a kernels.lora.LoRABatch (each
        token's adapter slot), or None for the base model alone."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta, lora)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.logits(hidden)

    def lora_targets(self):
        """(layer index, linear layer, its PEFT modules) for every layer an adapter may change."""
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for name, mod in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj), ("gate_up_proj", mlp.gate_up_proj),
                              ("down_proj", mlp.down_proj)):
                yield i, mod, self._LORA[name]

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def checkpoint_mapping(self, name: str) -> tuple[str, object] | None:
        """Map a checkpoint tensor name to (our parameter name, shard id); None = skip."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight":
            return None if self.cfg.tie_word_embeddings else ("lm_head.weight", None)
        if name.startswith("model."):
            name = name[len("model.") :]
        name = checkpoint_name(name, self.cfg)  # FP8 scales: renamed or skipped
        if name is None:
            return None
        m = self._MERGED_RE.search(name)
        if m:
            merged, shard = self._MERGED[m.group(1)]
            return name.replace(f".{m.group(1)}.", f".{merged}.", 1), shard
        return name, None
