"""The random-weight HF checkpoint maker (ziggurat.models.maker)."""

from __future__ import annotations

import ast
import json
import pathlib
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from ziggurat.models import maker as mm

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

# name -> (arch, make_model kwargs)
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied-sharded": ("llama", dict(tie_word_embeddings=True, max_shard_bytes=60_000)),
    "mistral-mha-bf16": ("mistral", dict(num_kv_heads=4, dtype="bfloat16")),
    "qwen2": ("qwen2", {}),
    "qwen2-mqa-sharded": ("qwen2", dict(num_kv_heads=1, max_shard_bytes="100KB", tie_word_embeddings=True)),
    "qwen3": ("qwen3", {}),
    "qwen3-untied-sharded-3l": ("qwen3", dict(tie_word_embeddings=False, max_shard_bytes=50_000,
                                              overrides={"num_hidden_layers": 3})),
}
TEXTS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "café naïve résumé — 日本語のテキスト 😀🚀 Привет, мир! ∑√π",
    "def f(x):\n    return x ** 2  # square\n\n\tTabs and   spaces ",
    "I'm sure they'll say it's 2024-05-17 at 09:30; cost: $1,234.56",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("make_model")
    return {name: mm.make_model(root / name, arch, **kw) for name, (arch, kw) in VARIANTS.items()}


def _file_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_loads_exactly_and_runs(models, name):
    path = models[name]
    arch, kw = VARIANTS[name]
    dtype = getattr(torch, kw.get("dtype", "float32"))
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    assert type(model).__name__ == mm._ARCH_CLASS[arch]

    files = _file_tensors(path)
    sd = model.state_dict()
    tied = kw.get("tie_word_embeddings", arch == "qwen3")
    assert ("lm_head.weight" in files) == (not tied)
    assert set(sd) == set(files) | ({"lm_head.weight"} if tied else set())
    for k, t in files.items():  # what HF holds is exactly what we wrote (nothing re-initialised)
        assert t.dtype == dtype and torch.equal(sd[k], t), k
    if tied:
        assert torch.equal(sd["lm_head.weight"], files["model.embed_tokens.weight"])

    ids = torch.tensor([[5, 17, 300, 999, 42, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, model.config.vocab_size)
    assert torch.isfinite(logits.float()).all() and logits.float().std() > 0


def test_config_round_trip(models):
    for name, (arch, kw) in VARIANTS.items():
        raw = json.loads((models[name] / "config.json").read_text())
        cfg = AutoConfig.from_pretrained(models[name])
        assert cfg.architectures == [mm._ARCH_CLASS[arch]] == raw["architectures"]
        assert cfg.model_type == raw["model_type"] == arch
        assert cfg.num_attention_heads == 4 and cfg.hidden_size == 64 and cfg.vocab_size == 1024
        assert cfg.num_key_value_heads == kw.get("num_kv_heads", 2)
        assert cfg.head_dim == raw["head_dim"] == (32 if arch == "qwen3" else 16)
        assert cfg.num_hidden_layers == kw.get("overrides", {}).get("num_hidden_layers", 2)
        assert cfg.tie_word_embeddings == kw.get("tie_word_embeddings", arch == "qwen3")
        assert raw["torch_dtype"] == kw.get("dtype", "float32") and raw["hidden_act"] == "silu"
        rope = cfg.rope_parameters
        assert rope["rope_theta"] == raw["rope_theta"] == 10000.0
        if arch == "llama":
            assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["mlp_bias"] is False
            assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
            assert rope["original_max_position_embeddings"] == 256 < cfg.max_position_embeddings
        else:
            assert raw.get("rope_scaling") is None and rope["rope_type"] == "default"
        if arch == "mistral":
            assert "sliding_window" in raw and raw["sliding_window"] is None
        if arch in ("qwen2", "qwen3"):
            assert raw["use_sliding_window"] is False
            assert raw["max_window_layers"] == raw["num_hidden_layers"]
        assert ("attention_bias" in raw) == (arch in ("llama", "qwen3"))  # as real configs: mistral, qwen2 omit it


def test_weight_layout_per_arch(models):
    for name, (arch, kw) in VARIANTS.items():
        t = _file_tensors(models[name])
        cfg = json.loads((models[name] / "config.json").read_text())
        hd, kv = cfg["head_dim"], cfg["num_key_value_heads"]
        assert t["model.layers.0.self_attn.q_proj.weight"].shape == (4 * hd, 64)
        assert t["model.layers.0.self_attn.k_proj.weight"].shape == (kv * hd, 64)
        assert t["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * hd)
        biases = sorted(k.split("layers.0.")[1] for k in t if k.startswith("model.layers.0.") and k.endswith(".bias"))
        if arch == "qwen2":
            assert biases == [f"self_attn.{p}_proj.bias" for p in "kqv"]
            assert t["model.layers.0.self_attn.k_proj.bias"].shape == (kv * hd,)
        else:
            assert biases == []
        has_qk_norm = "model.layers.0.self_attn.q_norm.weight" in t
        assert has_qk_norm == (arch == "qwen3")
        if has_qk_norm:
            assert t["model.layers.0.self_attn.k_norm.weight"].shape == (hd,)
        norm = t["model.layers.1.input_layernorm.weight"].float()
        assert not torch.all(norm == 1) and (norm - 1).abs().max() < 0.5
        w = t["model.layers.0.mlp.gate_proj.weight"].float()
        assert w.shape == (128, 64) and 0.015 < w.std() < 0.025


def test_generation_and_special_ids(models):
    for name, (arch, _) in VARIANTS.items():
        p = models[name]
        tok = Tokenizer.from_file(str(p / "tokenizer.json"))
        cfg = json.loads((p / "config.json").read_text())
        gen = json.loads((p / "generation_config.json").read_text())
        tcfg = json.loads((p / "tokenizer_config.json").read_text())
        assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast"
        added = {int(i): d["content"] for i, d in tcfg["added_tokens_decoder"].items()}
        assert all(d["special"] for d in tcfg["added_tokens_decoder"].values())
        assert all(tok.token_to_id(c) == i for i, c in added.items())
        if arch in ("llama", "mistral"):
            assert added == {1000: "<|begin_of_text|>", 1001: "<|end_of_text|>", 1002: "<|start_header_id|>",
                             1003: "<|end_header_id|>", 1004: "<|eot_id|>"}
            assert cfg["bos_token_id"] == gen["bos_token_id"] == 1000
            assert cfg["eos_token_id"] == gen["eos_token_id"] == [1001, 1004]
            assert (tcfg["bos_token"], tcfg["eos_token"]) == ("<|begin_of_text|>", "<|eot_id|>")
        else:
            assert added == {1000: "<|endoftext|>", 1001: "<|im_start|>", 1002: "<|im_end|>"}
            assert cfg["bos_token_id"] == gen["bos_token_id"] == 1000
            assert cfg["eos_token_id"] == 1002 and gen["eos_token_id"] == [1002, 1000]
            assert (tcfg["bos_token"], tcfg["eos_token"]) == (None, "<|im_end|>")
        assert tcfg["pad_token"] in added.values() and tcfg["model_max_length"] == 2048
        assert tok.get_vocab_size() <= cfg["vocab_size"]


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_tokenizer_round_trip(models, name):
    p = models[name]
    llama_style = name == "llama"
    raw = Tokenizer.from_file(str(p / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(p)
    assert 1000 <= raw.get_vocab_size() <= 1024
    for text in TEXTS:
        enc = raw.encode(text)
        assert all(i < raw.get_vocab_size() for i in enc.ids)
        assert (enc.ids[0] == 1000) == llama_style  # Llama 3 post-processor prepends BOS; Qwen adds none
        assert raw.decode(enc.ids) == text
        assert raw.decode(enc.ids, skip_special_tokens=False) == ("<|begin_of_text|>" if llama_style else "") + text
        assert hf(text).input_ids == enc.ids  # transformers tokenizes identically (even as Qwen2Tokenizer)
        assert hf.decode(enc.ids, skip_special_tokens=True) == text
        assert raw.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False).input_ids
    # multi-byte characters were learned as merges, and every byte is encodable
    assert len(raw.encode(" こんにちは café", add_special_tokens=False).ids) <= 6  # 22 bytes
    every = bytes(range(32, 127)).decode() + "\x00\x01\x7f\u00ff\u0100\U0001F9A0\uFFFD"
    assert raw.decode(raw.encode(every, add_special_tokens=False).ids) == every
    special = "<|im_end|>" if not llama_style else "<|eot_id|>"
    assert raw.encode(f"a{special}b", add_special_tokens=False).ids[1] == raw.token_to_id(special)


def test_chat_template(models):
    llama = AutoTokenizer.from_pretrained(models["mistral-mha-bf16"])
    qwen = AutoTokenizer.from_pretrained(models["qwen3"])
    hdr = "<|start_header_id|>{}<|end_header_id|>\n\n"
    want_llama = ("<|begin_of_text|>" + hdr.format("system") + "You are terse.<|eot_id|>"
                  + hdr.format("user") + "Hi there<|eot_id|>" + hdr.format("assistant") + "Hello.<|eot_id|>"
                  + hdr.format("user") + "Bye<|eot_id|>")
    want_qwen = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")
    for tok, want, gen_prompt in ((llama, want_llama, hdr.format("assistant")),
                                  (qwen, want_qwen, "<|im_start|>assistant\n")):
        assert tok.apply_chat_template(CHAT, tokenize=False) == want
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert text == want + gen_prompt
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == tok(text, add_special_tokens=False).input_ids  # template's own BOS only: no double BOS
        assert tok.decode(ids) == text
    assert llama.eos_token_id == 1004 and qwen.eos_token_id == 1002 and qwen.bos_token is None


def test_deterministic_bytes(tmp_path):
    a = mm.make_model(tmp_path / "a", "qwen2", seed=7)
    b = mm.make_model(tmp_path / "b", "qwen2", seed=7)
    c = mm.make_model(tmp_path / "c", "qwen2", seed=8)
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    # values depend only on (seed, name): sharding does not change them
    d = mm.make_model(tmp_path / "d", "qwen2", seed=7, max_shard_bytes=80_000)
    ta, td = _file_tensors(a), _file_tensors(d)
    assert ta.keys() == td.keys() and all(torch.equal(ta[k], td[k]) for k in ta)
    # re-writing a directory single-file removes stale shards
    mm.make_model(d, "qwen2", seed=7)
    assert sorted(x.name for x in d.glob("model*")) == ["model.safetensors"]


def test_shard_index_matches_files(models):
    for name in ("llama-tied-sharded", "qwen2-mqa-sharded", "qwen3-untied-sharded-3l"):
        p = models[name]
        limit = mm.parse_size(VARIANTS[name][1]["max_shard_bytes"])
        index = json.loads((p / "model.safetensors.index.json").read_text())
        assert set(index) == {"metadata", "weight_map"}
        shards = sorted(x.name for x in p.glob("*.safetensors"))
        n = len(shards)
        assert n > 1 and not (p / "model.safetensors").exists()
        assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert sorted(set(index["weight_map"].values())) == shards
        total = 0
        for shard in shards:
            with safe_open(p / shard, "pt") as f:
                keys = set(f.keys())
                assert f.metadata() == {"format": "pt"}
                sizes = [f.get_tensor(k).nbytes for k in keys]
            assert keys == {k for k, v in index["weight_map"].items() if v == shard}
            assert sum(sizes) <= limit or len(keys) == 1
            total += sum(sizes)
        assert index["metadata"]["total_size"] == total


def test_streaming_writer_is_byte_identical(tmp_path):
    for dtype in ("float32", "bfloat16"):
        cfg = mm.build_config("qwen3", "tiny", dtype=dtype)
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "b").mkdir(exist_ok=True)
        mm.write_weights(tmp_path / "a", cfg, dtype=dtype, seed=1)  # safetensors.save_file
        mm.write_weights(tmp_path / "b", cfg, dtype=dtype, seed=1, stream_threshold=0)
        assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


@pytest.mark.parametrize("arch,preset", [("qwen3", "qwen3-0.6b"), ("llama", "llama-3.1-8b"), ("qwen2", "qwen3-0.6b")])
def test_big_preset_shapes_match_hf(tmp_path, arch, preset):
    cfg = mm.build_config(arch, preset, dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hc = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hc)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if hc.tie_word_embeddings:
        want.pop("lm_head.weight")
    assert {n: s for n, s, _ in mm.weight_specs(cfg)} == want
    if preset == "qwen3-0.6b":
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"], cfg["vocab_size"]) == (1024, 28, 128, 151936)
        assert cfg["tie_word_embeddings"] is True and cfg["max_position_embeddings"] == 40960
    else:
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (4096, 32, 14336)
        assert cfg["rope_scaling"]["original_max_position_embeddings"] == 8192
        assert hc.rope_parameters["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is False
        assert sum(torch.Size(s).numel() for s in want.values()) == 8_030_261_248


def test_sizes_gqa_validation_and_cache():
    assert mm.parse_size("2GB") == 2 * 10**9 and mm.parse_size("500MiB") == 500 * 2**20
    assert mm.parse_size(123) == 123 and mm.parse_size("1.5kb") == 1500
    with pytest.raises(ValueError):
        mm.build_config("llama", "tiny", num_kv_heads=3)
    with pytest.raises(ValueError):
        mm.build_config("gpt2", "tiny")
    assert mm.build_config("qwen3", "tiny", num_kv_heads=4)["num_key_value_heads"] == 4
    s = mm._base_tokenizer_json("qwen", 1000)
    assert mm._base_tokenizer_json("qwen", 1000) is s  # trained once per process


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = mm.main([str(out), "--arch", "qwen3", "--dtype", "bfloat16", "--no-tie", "--kv-heads", "1",
                  "--shard-size", "100KB", "--seed", "3", "--set", "num_hidden_layers=1",
                  "--set", 'rope_scaling={"rope_type": "linear", "factor": 2.0}'])
    assert rc == 0 and str(out) in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["max_window_layers"] == 1 and cfg["num_key_value_heads"] == 1
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == "bfloat16" and (out / "model.safetensors.index.json").exists()
    assert "lm_head.weight" in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert mm.main([str(tmp_path / "bad"), "--kv-heads", "3"]) == 2


def test_imports_only_serve_time_packages():
    tree = ast.parse(pathlib.Path(mm.__file__).read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    allowed = {"torch", "safetensors", "tokenizers", "__future__", "argparse", "copy", "json", "os", "pathlib",
               "random", "re", "struct", "sys", "zlib", "typing", "collections", "concurrent",
               "ziggurat"}  # --quantize fp8: models/quantization.py's quantize_weight (torch only)
    assert mods and mods <= allowed, mods - allowed
    assert not re.search(r"^\s*(import|from)\s+transformers", pathlib.Path(mm.__file__).read_text(), re.M)


def test_ids_past_the_tokenizer_have_zero_output_rows(tmp_path):
    """A padded config vocab (128k) beyond the local tokenizer (8k): greedy
    decoding must stay on ids that decode to text, so their output rows are zero."""
    import json

    from safetensors import safe_open

    from ziggurat.models.maker import make_model

    for arch, preset_vocab, tie in (("llama", 3000, False), ("qwen3", 3000, True)):
        out = make_model(tmp_path / arch, arch=arch, preset="tiny", overrides={"vocab_size": preset_vocab},
                         tie_word_embeddings=tie)
        n_tok = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) + 8
        name = "model.embed_tokens.weight" if tie else "lm_head.weight"
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            w = f.get_tensor(name)
        live = (w.abs().sum(1) > 0).nonzero().max().item() + 1
        assert 1000 <= live <= n_tok < preset_vocab  # rows up to the tokenizer's ids are random, the rest zero
        assert w[live:].abs().sum() == 0
