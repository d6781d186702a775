"""Bad input gets an error that names the file, tensor or field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ziggurat import LLM, SamplingParams
from ziggurat.models.config import ModelConfigError
from ziggurat.models.loader import ModelLoadError
from ziggurat.sampling_params import SamplingParamsError


@pytest.fixture
def model_copy(llama_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(llama_dir, dst)
    return dst


def edit_config(path, **changes):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


def test_unknown_architecture(model_copy):
    edit_config(model_copy, architectures=["GPTBigCodeForCausalLM"])
    with pytest.raises(ModelConfigError, match=r"config\.json.*unsupported architecture 'GPTBigCodeForCausalLM'"):
        LLM(model_copy)


def test_missing_config_and_field(model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg["hidden_size"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"config\.json: missing field 'hidden_size'"):
        LLM(model_copy)
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelConfigError, match=r"config\.json: missing"):
        LLM(model_copy)
    with pytest.raises(ValueError, match="does not exist"):
        LLM(tmp_path / "nowhere")


def test_missing_weights_file(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        LLM(model_copy)


def test_truncated_weights_file(model_copy):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        LLM(model_copy)


def test_tensor_of_wrong_shape(model_copy):
    f = model_copy / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"tensor '{name}' has shape \[64, 129\], expected \[64, 128\]"):
        LLM(model_copy)


def test_missing_tensor(model_copy):
    f = model_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing 1 tensor.*layers\.0\.self_attn\.qkv_proj\.weight\[k\]"):
        LLM(model_copy)


def test_missing_shard(model_factory, tmp_path):
    src = model_factory("qwen3", max_shard_bytes=200_000)
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=rf"{shards[-1].name}: missing \(listed in model\.safetensors\.index\.json\)"):
        LLM(dst)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, num_kv_blocks=64, max_model_len=128)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"prompt 0: 200 tokens leave no room.*max_model_len=128"):
        llm.generate([[1] * 200], SamplingParams(max_tokens=4))
    # Nothing was half-added: the engine still works.
    assert not llm.engine.has_unfinished()
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids) == 2


def test_token_ids_outside_vocab(llm):
    with pytest.raises(ValueError, match=r"token id 5000 is outside the vocabulary"):
        llm.generate([[1, 5000]])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(n=0), "n"),
        (dict(logprobs=100), "logprobs"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(seed="x"), "seed"),
    ],
)
def test_invalid_sampling_values(kwargs, field):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field + ":")


def test_stream_cleanup_runs_when_the_client_leaves_before_the_headers():
    """If sending the response start fails (client gone), the SSE generator never
    starts and its `finally` never runs; ClosingStream still calls on_close, so
    the request is aborted and its token reservation released."""
    import asyncio

    from ziggurat.actors.ingress.server import ClosingStream

    started, closed = [], []

    async def body():
        started.append(True)
        yield "data: x\n\n"

    async def send(message):
        raise OSError("connection reset")

    async def receive():
        return {"type": "http.disconnect"}

    resp = ClosingStream(body(), on_close=lambda: closed.append(True), media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    try:
        asyncio.run(resp(scope, receive, send))
    except Exception:
        pass  # starlette reports the disconnect; what matters is the cleanup
    assert closed == [True] and started == []
