"""FP8 models end to end on the CPU (torch reference paths): checkpoints read, quantize-at-load,
the FP8 KV cache, and their numerics against the same model with dequantized weights.

Tolerances, and why:
- The fp8 model in its weight-only numerics (ZIGGURAT_FP8_GEMM=dequant) against
  a 16-bit checkpoint holding its dequantized weights (weight * scale, computed
  in fp32): the same weights, the same fp32 matmuls: < 1e-5 in fp32.
- The default numerics quantize prefill activations per token (W8A8): each
  activation is rounded to e4m3 (<= 2^-4 relative, ~3.6% RMS), which
  random-weight layers pass on roughly unattenuated (measured: 0.023-0.029):
  logits within 0.06 relative of the dequantized model, and the argmax of at
  least 90% of the positions agrees (measured 95-97%).
- FP8 KV cache: keys and values rounded to e4m3 (same ~3.6% RMS per element);
  attention averages over positions (measured 0.017-0.023): within 0.06.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ziggurat.config import ConfigError, EngineConfig
from ziggurat.kernels.attention import AttentionMetadata
from ziggurat.kernels.fp8 import FP8
from ziggurat.models import loader
from ziggurat.models.config import ModelConfig, ModelConfigError
from ziggurat.models.maker import make_model
from ziggurat.models.quantization import QuantizationError, dequantize_weight, parse_config, quantize_weight
from ziggurat.models.registry import model_class
from ziggurat.models.runner import ModelRunner
from ziggurat.topology import distributed

PROMPTS = [[5, 6, 7, 8, 9] * 4 + [100, 200], list(range(3, 40))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama in fp32 and bf16, each as 16 bits and as make-model --quantize fp8 (same seed)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        for q in (None, "fp8"):
            path = tmp_path_factory.mktemp(f"llama-{dtype}-{q}")
            out[dtype, q] = make_model(path, arch="llama", dtype=dtype, quantize=q, seed=3)
    return out


def runner(path, **kw) -> ModelRunner:
    cfg = ModelConfig.from_dir(path, **kw)
    r = ModelRunner(cfg, torch.device("cpu"), 16, max_model_len=256)
    r.allocate_kv_cache(16)
    return r


def prefill_logits(r: ModelRunner, ids: list[int]) -> torch.Tensor:
    """All positions' logits of one prompt run as a fresh prefill into blocks 0.."""
    n = len(ids)
    pos = torch.arange(n)
    meta = AttentionMetadata(slot_mapping=pos.clone(), query_start_loc=torch.tensor([0, n]),
                             seq_lens=torch.tensor([n]),
                             block_tables=torch.arange((n + 15) // 16, dtype=torch.int32).unsqueeze(0),
                             query_start_loc_cpu=[0, n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n)
    with torch.inference_mode():
        return r.model.compute_logits(r.model(torch.tensor(ids), pos, meta)).float()


def rel(a, b) -> float:
    assert not torch.isnan(a).any()
    return ((a - b).norm() / b.norm()).item()


def dequantized_copy(fp8_dir, out, dtype=torch.float32):
    """The 16-bit checkpoint of an FP8 one: every weight times its scale (fp32), in `dtype`."""
    shutil.copytree(fp8_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(out / "model.safetensors"))
    deq = {}
    for name, x in t.items():
        if name.endswith("_scale"):
            continue
        deq[name] = dequantize_weight(x, t[name + "_scale"], dtype) if x.dtype == FP8 else x.to(dtype)
    save_file(deq, str(out / "model.safetensors"))
    return out


def test_make_model_writes_a_compressed_tensors_fp8_checkpoint(models):
    path = models["bfloat16", "fp8"]
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["ignore"] == ["lm_head"]
    spec = parse_config(q, path / "config.json")
    assert (spec.source, spec.weight_strategy, spec.dynamic_activations) == ("checkpoint", "channel", True)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_shape() == [64, 1]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_dtype() == "BF16"
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    # The same random weights as the 16-bit model, rounded: dequantized, within e4m3's 2^-4 relative step.
    w16 = load_file(str(models["bfloat16", None] / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    t8 = load_file(str(path / "model.safetensors"))
    deq = dequantize_weight(t8["model.layers.1.self_attn.q_proj.weight"], t8["model.layers.1.self_attn.q_proj.weight_scale"])
    assert ((deq - w16.float()).abs() <= w16.float().abs() * 2**-4 + 1e-6).all()


def test_sharded_fp8_checkpoint_loads(tmp_path):
    path = make_model(tmp_path / "m", arch="qwen3", quantize="fp8", max_shard_bytes="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and "model.layers.0.self_attn.k_proj.weight_scale" in index
    r = runner(path)
    assert r.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8
    assert prefill_logits(r, PROMPTS[0]).isfinite().all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_checkpoint_equals_its_dequantized_weights(models, tmp_path, monkeypatch, dtype):
    r8 = runner(models[dtype, "fp8"])
    lin = r8.model.layers[0].mlp.gate_up_proj
    assert lin.weight.dtype == FP8 and lin.weight_scale.shape == (256,) and lin.input_scale is None
    ref = runner(dequantized_copy(models[dtype, "fp8"], tmp_path / "deq"))  # fp32 compute
    for ids in PROMPTS:
        want = prefill_logits(ref, ids)
        monkeypatch.setenv("ZIGGURAT_FP8_GEMM", "dequant")
        got = prefill_logits(r8, ids)
        # fp32: the same products; bf16: activations rounded to bf16 between layers (~2^-9 per element).
        assert rel(got, want) < (1e-5 if dtype == "float32" else 2e-2)
        monkeypatch.setenv("ZIGGURAT_FP8_GEMM", "auto")  # a prefill: W8A8
        got = prefill_logits(r8, ids)
        assert rel(got, want) < 0.06
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_at_load_equals_loading_the_written_checkpoint(models, dtype):
    at_load = runner(models[dtype, None], quantization="fp8")
    written = runner(models[dtype, "fp8"])
    a, b = dict(at_load.model.named_parameters()), dict(written.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)) if a[name].dtype == FP8 \
            else torch.equal(a[name], b[name]), name
    assert a["layers.0.self_attn.qkv_proj.weight"].dtype == FP8
    assert a["lm_head.weight"].dtype == getattr(torch, dtype)  # lm_head and embeddings stay in 16 bits
    assert torch.equal(prefill_logits(at_load, PROMPTS[1]), prefill_logits(written, PROMPTS[1]))


def per_tensor_checkpoint(src16, out, static: bool, method: str):
    """An FP8 checkpoint with per-tensor scales (each of q, k, v its own), as vLLM's fp8 or
    compressed-tensors' tensor strategy writes it; static activation scales per shard."""
    shutil.copytree(src16, out)
    cfg = json.loads((out / "config.json").read_text())
    if method == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    else:
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                      "config_groups": {"g": {"targets": ["Linear"], "weights": {
                                          "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True},
                                          "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                                "dynamic": False} if static else None}},
                                      "ignore": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(out / "model.safetensors"))
    res, deq = {}, {}
    for i, (name, w) in enumerate(sorted(t.items())):
        if ".layers." in name and name.endswith("_proj.weight"):
            s = w.float().abs().max() / 448
            res[name] = (w.float() / s).clamp(-448, 448).to(FP8)
            res[name + ("_scale_inv" if method == "fp8" else "_scale")] = s.reshape(())
            if static:
                res[name.replace(".weight", ".input_scale")] = torch.tensor([0.01 * (1 + i % 3)])
            deq[name] = res[name].float() * s
        else:
            res[name] = deq[name] = w
    save_file(res, str(out / "model.safetensors"))
    return out, deq


@pytest.mark.parametrize("method", ["fp8", "compressed-tensors"])
def test_per_tensor_scales_keep_each_fused_shard_exact(models, tmp_path, monkeypatch, method):
    path, deq = per_tensor_checkpoint(models["float32", None], tmp_path / "pt", static=True, method=method)
    r = runner(path)
    qkv = r.model.layers[0].self_attn.qkv_proj
    w = qkv.weight.float() * qkv.weight_scale[:, None]
    want = torch.cat([deq[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.allclose(w, want, rtol=1e-6, atol=0)  # per-shard scales kept: nothing requantized
    assert len(set(qkv.weight_scale.tolist())) == 3  # q, k and v each their own
    t = load_file(str(path / "model.safetensors"))
    merged = max(t[f"model.layers.0.self_attn.{p}_proj.input_scale"].item() for p in "qkv")
    assert qkv.input_scale.tolist() == [pytest.approx(merged)]  # the max of the shards' static scales
    monkeypatch.setenv("ZIGGURAT_FP8_GEMM", "dequant")
    ref = runner(dequantized_copy_from(deq, models["float32", None], tmp_path / "d"))
    assert rel(prefill_logits(r, PROMPTS[0]), prefill_logits(ref, PROMPTS[0])) < 1e-5


def dequantized_copy_from(tensors, src, out):
    shutil.copytree(src, out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("size", [2, 4])
def test_tp_ranks_hold_their_fp8_slices(models, monkeypatch, size):
    path = models["bfloat16", "fp8"]
    full = load_file(str(path / "model.safetensors"))
    for rank in range(size):
        monkeypatch.setattr(distributed, "_TP", distributed.TPGroup(rank=rank, size=size, group=None))
        cfg = ModelConfig.from_dir(path)
        model = model_class(cfg)(cfg)
        loader.load_weights(model, path)
        gu = model.layers[1].mlp.gate_up_proj
        rows = 128 // size
        g_w, g_s, u_w, u_s = (full[f"model.layers.1.mlp.{p}_proj.weight{s}"] for p in ("gate", "up")
                              for s in ("", "_scale"))
        sl = slice(rank * rows, (rank + 1) * rows)
        assert torch.equal(gu.weight.view(torch.uint8), torch.cat([g_w[sl], u_w[sl]]).view(torch.uint8))
        assert torch.equal(gu.weight_scale, torch.cat([g_s[sl], u_s[sl]]).float().view(-1))
        down = model.layers[1].mlp.down_proj  # row-parallel: columns split, every channel's scale whole
        cols = 128 // size
        d_w = full["model.layers.1.mlp.down_proj.weight"]
        assert torch.equal(down.weight.view(torch.uint8), d_w[:, rank * cols : (rank + 1) * cols].view(torch.uint8))
        assert torch.equal(down.weight_scale, full["model.layers.1.mlp.down_proj.weight_scale"].float().view(-1))


def test_fp8_kv_cache(models, tmp_path):
    path = models["float32", None]
    r16, r8 = runner(path), runner(path, kv_cache_dtype="fp8")
    assert r8.kv_cache_dtype == FP8 and r8.model.layers[0].self_attn.attn.k_cache.dtype == FP8
    assert r8.kv_block_bytes() * 4 == r16.kv_block_bytes()  # 1-byte elements (fp32 model)
    assert runner(models["bfloat16", None], kv_cache_dtype="fp8").kv_block_bytes() * 2 == \
        runner(models["bfloat16", None]).kv_block_bytes()
    for ids in PROMPTS:
        a, b = prefill_logits(r8, ids), prefill_logits(r16, ids)
        assert rel(a, b) < 0.06
    # The checkpoint's k_scale / v_scale (compressed-tensors' kv_cache_scheme names) are read into the layers.
    shutil.copytree(path, tmp_path / "s")
    t = load_file(str(tmp_path / "s" / "model.safetensors"))
    t["model.layers.1.self_attn.k_scale"] = torch.tensor(0.125)
    t["model.layers.1.self_attn.v_proj.output_scale"] = torch.tensor([0.25])
    save_file(t, str(tmp_path / "s" / "model.safetensors"))
    rs = runner(tmp_path / "s", kv_cache_dtype="fp8")
    attn = rs.model.layers[1].self_attn.attn
    assert (attn.k_scale.item(), attn.v_scale.item()) == (0.125, 0.25)
    assert rs.model.layers[0].self_attn.attn.k_scale.item() == 1.0  # absent: 1.0
    assert rel(prefill_logits(rs, PROMPTS[1]), prefill_logits(r16, PROMPTS[1])) < 0.06
    assert runner(tmp_path / "s").model.layers[1].self_attn.attn.k_scale is None  # 16-bit cache: skipped


def test_engine_generates_with_fp8_weights_and_kv_cache(models):
    from ziggurat import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = LLM(models["float32", None], num_kv_blocks=32)
    want = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, params)]
    ref.shutdown()
    llm = LLM(models["float32", "fp8"], num_kv_blocks=32, kv_cache_dtype="fp8")
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    llm.shutdown()
    assert all(len(g) == 24 for g in got)
    agree = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / 48
    assert agree > 0.5  # random tiny weights: near-ties flip, but mostly the same tokens


# -- what is refused, and how -----------------------------------------------------------


@pytest.mark.parametrize("raw,field", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme"),
    ({"quant_method": "awq"}, "quant_method"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}, "format"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "float", "strategy": "channel"}}}}, "config_groups.g.weights.num_bits"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "group"}}}}, "config_groups.g.weights.strategy"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": True}}}},
     "input_activations.strategy"),
])
def test_unsupported_quantization_configs_are_refused_naming_the_field(models, tmp_path, raw, field):
    shutil.copytree(models["float32", None], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = raw
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=field) as e:
        ModelConfig.from_dir(tmp_path / "m")
    assert "config.json" in str(e.value)


def test_dtype_mismatches_are_refused_naming_file_and_tensor(models, tmp_path):
    # FP8 tensors without a quantization_config: refused, not cast.
    shutil.copytree(models["float32", "fp8"], tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"model.safetensors: tensor 'model.layers.0.*' is FP8"):
        runner(tmp_path / "a")
    # A quantization_config over 16-bit tensors: refused too.
    shutil.copytree(models["float32", None], tmp_path / "b")
    cfg["quantization_config"] = json.loads((models["float32", "fp8"] / "config.json").read_text())[
        "quantization_config"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"is F32, but quantization_config makes .* FP8"):
        runner(tmp_path / "b")
    # ignore naming part of a fused layer.
    cfg["quantization_config"]["ignore"] = ["lm_head", "model.layers.0.self_attn.k_proj"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match="ignores only part of"):
        runner(tmp_path / "b")
    # ...and ignoring whole fused layers leaves them in 16 bits (regex entries too).
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(models["float32", "fp8"], tmp_path / "a")
    deq = load_file(str(models["float32", None] / "model.safetensors"))
    t = load_file(str(tmp_path / "a" / "model.safetensors"))
    for p in ("q", "k", "v"):
        name = f"model.layers.1.self_attn.{p}_proj.weight"
        t[name] = deq[name]
        del t[name + "_scale"]
    save_file(t, str(tmp_path / "a" / "model.safetensors"))
    cfg["quantization_config"]["ignore"] = ["lm_head", "re:.*layers\\.1\\.self_attn\\.[qkv]_proj"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    r = runner(tmp_path / "a")
    assert r.model.layers[1].self_attn.qkv_proj.weight.dtype == torch.float32
    assert r.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8


def test_engine_settings_are_validated_once(models):
    path = str(models["float32", None])
    with pytest.raises(ConfigError, match="quantization: must be one of"):
        EngineConfig(model=path, quantization="int4")
    with pytest.raises(ConfigError, match="kv_cache_dtype: must be one of"):
        EngineConfig(model=path, kv_cache_dtype="fp16")
    from ziggurat.cluster.cli import add_fields
    import argparse

    ap = argparse.ArgumentParser()
    add_fields(ap, EngineConfig)
    args = ap.parse_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8"])
    assert (args.quantization, args.kv_cache_dtype) == ("fp8", "fp8")


def test_quantize_weight_rounds_per_channel():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1000.0, 3.0, -0.001]])
    q, s = quantize_weight(w)
    assert torch.equal(s, torch.tensor([2.0 / 448, 1e-12, 1000.0 / 448]))
    assert q.float()[0].tolist() == [224.0, -448.0, 112.0] and q.float()[1].tolist() == [0.0, 0.0, 0.0]
    assert q.float()[2, 0] == 448.0 and not torch.isnan(q.float()).any()


def _tp_rank_quantizes(rank, port, path16, path8, q):
    """One rank of a real 2-way gloo group: quantize-at-load must equal its slice of the written checkpoint."""
    try:
        distributed.init_tensor_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "gloo")
        cfg16 = ModelConfig.from_dir(path16, quantization="fp8")
        a = model_class(cfg16)(cfg16)
        loader.load_weights(a, path16)
        cfg8 = ModelConfig.from_dir(path8)
        b = model_class(cfg8)(cfg8)
        loader.load_weights(b, path8)
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        same = all(torch.equal(pa[n].view(torch.uint8), pb[n].view(torch.uint8)) if pa[n].dtype == FP8
                   else torch.equal(pa[n], pb[n]) for n in pb)
        q.put((rank, pa.keys() == pb.keys() and same, pa["layers.0.mlp.down_proj.weight"].dtype == FP8))
    except Exception as e:  # reported, not hung on
        q.put((rank, repr(e), False))
    finally:
        distributed.destroy_tensor_parallel()


def test_quantize_at_load_under_tp2_equals_the_written_checkpoint(models):
    """Row-parallel shards all-reduce their rows' absmax, so a TP=2 rank quantizes to its
    slice of the TP=1 values (down_proj's scales come from the whole row, not the shard's half)."""
    import multiprocessing as mp

    from conftest import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_tp_rank_quantizes, args=(r, port, models["float32", None], models["float32", "fp8"], q))
             for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == [(0, True, True), (1, True, True)]
