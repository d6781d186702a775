"""A GGUF file (llama.cpp's format) as a model: its config, tensors and tokenizer.

A `.gguf` file, or a directory holding exactly one (and no config.json), is a
model. Its metadata becomes the same config dict an HF `config.json` holds
(parsed by `ModelConfig.from_dict`, so one validator serves both formats),
its tensors are offered under their HF names through the loader's
TensorSource interface, dequantized at load into the model's dtype
(models/gguf_dequant.py), and its tokenizer and chat template are rebuilt
from the metadata (models/gguf_tokenizer.py).

llama.cpp's converter reorders the rows of each Llama q/k projection head
(the rotary pairs interleaved); `read` restores HF's order, per head, so a
tensor-parallel rank that reads only its heads' rows gets them right.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

from ziggurat.models import gguf_dequant


class GGUFError(ValueError):
    pass


# general.architecture -> (HF architecture, q/k rows permuted by the converter)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names, if it names one; None for an HF directory."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(p.glob("*.gguf"))
    if len(found) > 1:
        if all(_SPLIT_RE.search(f.name) for f in found):
            raise GGUFError(f"{p}: a GGUF split into {len(found)} files is not supported; merge it with "
                            "`llama-gguf-split --merge` first")
        raise GGUFError(f"{p}: holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
                        "pass the one to serve as --model")
    return found[0] if found else None


@functools.lru_cache(maxsize=4)
def _reader(file: Path, mtime_ns: int):
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"{file}: reading GGUF needs the `gguf` package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(file), "r")
    except Exception as e:
        raise GGUFError(f"{file}: not a readable GGUF file ({e})") from None


def reader(file: Path):
    return _reader(Path(file), Path(file).stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _metadata(file: Path, mtime_ns: int, arrays: bool) -> dict:
    out = {}
    for name, f in _reader(file, mtime_ns).fields.items():
        if name.startswith("GGUF."):
            continue
        if not arrays and len(f.data) > 1024:  # the vocabulary: only the tokenizer needs it (seconds to convert)
            continue
        try:
            out[name] = f.contents()
        except Exception as e:
            raise GGUFError(f"{file}: cannot read metadata key '{name}' ({e})") from None
    return out


def metadata(file: Path, arrays: bool = True) -> dict:
    """Key -> plain Python value (str, int, float, list) for every metadata key;
    arrays=False leaves out long arrays (the tokenizer's vocabulary and merges)."""
    return _metadata(Path(file), Path(file).stat().st_mtime_ns, arrays)


def _array_len(file: Path, name: str) -> int | None:
    f = reader(file).fields.get(name)
    return len(f.data) if f is not None else None


def config_dict(file: Path) -> dict:
    """The metadata as the fields of an HF config.json."""
    md = metadata(file, arrays=False)
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file}: unsupported GGUF architecture {arch!r}; supported: " + ", ".join(ARCHITECTURES))

    def key(name: str, default=...):
        full = f"{arch}.{name}"
        if full not in md:
            if default is ...:
                raise GGUFError(f"{file}: missing metadata key '{full}'")
            return default
        return md[full]

    heads = key("attention.head_count")
    if isinstance(heads, list):
        raise GGUFError(f"{file}: per-layer head counts ({arch}.attention.head_count is a list) are not supported")
    hidden = key("embedding_length")
    kv_heads = key("attention.head_count_kv", heads)
    n_tokens = _array_len(file, "tokenizer.ggml.tokens")
    names = {t.name for t in reader(file).tensors}
    raw = {
        "architectures": [ARCHITECTURES[arch][0]],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": key("attention.key_length", hidden // heads),
        "vocab_size": key("vocab_size", n_tokens),
        "max_position_embeddings": key("context_length", 4096),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": _natural_dtype(md.get("general.file_type")),
    }
    if raw["vocab_size"] is None:
        raise GGUFError(f"{file}: missing metadata key '{arch}.vocab_size' (and no tokenizer.ggml.tokens)")
    rot = key("rope.dimension_count", raw["head_dim"])
    if rot != raw["head_dim"]:
        raise GGUFError(f"{file}: partial rotary ({arch}.rope.dimension_count {rot} < head dim "
                        f"{raw['head_dim']}) is not supported")
    window = key("attention.sliding_window", None)
    if window:
        raw["sliding_window"] = window
        raw["use_sliding_window"] = True
    scaling = key("rope.scaling.type", None)
    if "rope_freqs.weight" in names:  # Llama 3.1's scaling, stored as per-frequency divisors
        freqs = dequantized(file, "rope_freqs.weight").flatten().tolist()
        raw["rope_scaling"] = {"rope_type": "freq_factors", "factors": freqs}
    elif scaling == "linear":
        raw["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise GGUFError(f"{file}: unsupported rope scaling {scaling!r} ({arch}.rope.scaling.type); supported: linear")
    return raw


def _natural_dtype(file_type) -> str:
    # llama.cpp's LLAMA_FTYPE: 1 = mostly F16, 32 = mostly BF16. Quantized
    # files default to float32 (exact dequantization); pass --dtype on a GPU.
    return {1: "float16", 32: "bfloat16"}.get(file_type, "float32")


def dequantized(file: Path, name: str, dtype=torch.float32) -> torch.Tensor:
    t = next((t for t in reader(file).tensors if t.name == name), None)
    if t is None:
        raise GGUFError(f"{file}: no tensor '{name}'")
    return _rows(file, t, 0, int(t.data.shape[0]) if t.data.ndim > 1 else 1, dtype)


def _rows(file: Path, t, start: int, length: int, dtype) -> torch.Tensor:
    """Rows [start, start + length) of tensor `t`, dequantized: (length, ne0)."""
    cols = int(t.shape[0])
    data = t.data if t.data.ndim > 1 else t.data.reshape(1, -1)
    data = data[start : start + length]
    where = f"{file}: tensor '{t.name}'"
    if data.dtype in (np.float32, np.float16):
        return torch.from_numpy(np.ascontiguousarray(data)).to(dtype).reshape(length, cols)
    return gguf_dequant.dequantize(int(t.tensor_type), np.ascontiguousarray(data), cols, dtype=dtype, where=where)


def hf_name(name: str) -> str | None:
    """llama.cpp's tensor name -> HF's; None for tensors the model does not load."""
    if name == "rope_freqs.weight":
        return None  # folded into the config's rope_scaling
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else name
    stem, _, kind = name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES else name


class GGUFTensorSource:
    """One GGUF tensor under its HF name and shape; reads dequantize only the rows asked for."""

    def __init__(self, file: Path, tensor, unpermute_heads: int | None, dtype: torch.dtype):
        self.file, self._t, self._dtype = file, tensor, dtype
        self.name = hf_name(tensor.name)
        self.shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists ne0 (columns) first
        self._heads = unpermute_heads  # q/k: rows hold this many heads in llama.cpp's order

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        from ziggurat.models.loader import ModelLoadError

        try:
            if len(self.shape) == 1:
                out = _rows(self.file, self._t, 0, 1, self._dtype).reshape(-1)
                if self._heads:  # a q/k bias, reordered like its weight's rows
                    out = out.reshape(self._heads, -1, 2).transpose(1, 2).reshape(-1)
                return out if dim is None else out.narrow(0, start, self.shape[0] - start if length is None else length)
            rows = self.shape[0]
            r0, n = (start, rows - start if length is None else length) if dim == 0 else (0, rows)
            out = _rows(self.file, self._t, r0, n, self._dtype)
        except gguf_dequant.GGUFQuantError as e:
            raise ModelLoadError(str(e)) from None
        if self._heads:
            head_dim = rows // self._heads
            if r0 % head_dim or n % head_dim:
                raise ModelLoadError(f"{self.file}: tensor '{self._t.name}': rows {r0}:{r0 + n} "
                                     f"split a head of {head_dim} rows")
            out = out.reshape(n // head_dim, head_dim // 2, 2, -1).transpose(1, 2).reshape(n, -1)
        out = out.reshape(n, *self.shape[1:])
        if dim not in (None, 0):
            out = out.narrow(dim, start, self.shape[dim] - start if length is None else length)
        return out.contiguous()

    def expect_shape(self, expected: tuple[int, ...]) -> None:
        from ziggurat.models.loader import ModelLoadError

        if self.shape != tuple(expected):
            raise ModelLoadError(f"{self.file}: tensor '{self._t.name}' ({self.name}) has shape {list(self.shape)}, "
                                 f"expected {list(expected)}")


def iter_tensors(file: Path, dtype: torch.dtype = torch.float32):
    raw = config_dict(file)
    permuted = ARCHITECTURES[metadata(file, arrays=False)["general.architecture"]][1]
    heads = {"attn_q": raw["num_attention_heads"], "attn_k": raw["num_key_value_heads"]}
    for t in reader(file).tensors:
        if hf_name(t.name) is None:
            continue
        m = _BLOCK_RE.match(t.name)
        part = m.group(2) if m else None
        yield GGUFTensorSource(file, t, heads.get(part) if permuted else None, dtype)
