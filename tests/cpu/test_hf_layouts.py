"""Checkpoint layouts that current tools write, and releasing an LLM.

- a model saved by transformers' `save_pretrained` (chat template in
  chat_template.jinja) serves chat through the openai SDK, logprob bytes raw;
- chat templates from chat_template.json and tokenizer_config.json's named list
  (default and tool_use); a model without one serves completions only;
- added_tokens_decoder, bos/eos as AddedToken dicts, generation_config's eos
  list and sampling defaults, torch_dtype vs dtype, sharded safetensors with
  and without an index;
- two LLMs in turn in one process, with TP 1 and TP 2.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil

import pytest
import torch

from conftest import OpenAIApp
from ziggurat import LLM, SamplingParams
from ziggurat.actors.ingress.protocol import parse_chat
from ziggurat.models.config import ModelConfig, sampling_defaults
from ziggurat.models.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOOL_TEMPLATE = "TOOLS {{ tools | length }} " + TEMPLATE
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 日本"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama_dir):
    """A tiny Llama written by transformers' save_pretrained, tokenizer and template included."""
    out = tmp_path_factory.mktemp("hf5") / "tiny-llama"
    cfg = transformers.LlamaConfig(vocab_size=ModelConfig.from_dir(llama_dir).vocab_size, hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(llama_dir / "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


def variant(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_save_pretrained_writes_the_current_layout(saved):
    assert (saved / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((saved / "tokenizer_config.json").read_text())
    ref = transformers.AutoTokenizer.from_pretrained(saved)
    assert Tokenizer(saved).apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False,
                                                                                 add_generation_prompt=True)


def test_save_pretrained_model_serves_chat_through_the_openai_sdk(saved):
    async def fn(http, sdk):
        r = await sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0,
                                              logprobs=True, top_logprobs=2)
        stream = await sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0,
                                                   stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return r, streamed

    app = OpenAIApp(saved, num_kv_blocks=64)
    try:
        r, streamed = app.run(fn)
    finally:
        app.close()
    text = r.choices[0].message.content
    assert r.usage.completion_tokens > 0 and streamed == text
    raw = b"".join(bytes(t.bytes) for t in r.choices[0].logprobs.content)
    # Raw token bytes: together they are the text (a random model may end mid-character).
    assert raw.decode("utf-8", errors="replace") == text or raw.decode("utf-8", errors="replace").startswith(text)
    for t in r.choices[0].logprobs.content:
        assert t.token != "\ufffd" or bytes(t.bytes) != "\ufffd".encode()


def test_chat_template_json_and_named_lists(saved, tmp_path):
    def as_json(d):
        (d / "chat_template.jinja").unlink()
        (d / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))

    def as_named_list(d):
        (d / "chat_template.jinja").unlink()
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": TOOL_TEMPLATE}]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))

    want = Tokenizer(saved).apply_chat_template(CHAT)
    assert Tokenizer(variant(saved, tmp_path / "json", as_json)).apply_chat_template(CHAT) == want
    named = Tokenizer(variant(saved, tmp_path / "named", as_named_list))
    assert named.apply_chat_template(CHAT) == want
    assert named.apply_chat_template(CHAT, tools=[{"type": "function"}]) == "TOOLS 1 " + want


def test_a_model_without_a_template_serves_completions_and_says_chat_needs_one(saved, tmp_path, caplog):
    bare = variant(saved, tmp_path / "bare", lambda d: (d / "chat_template.jinja").unlink())
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(bare).apply_chat_template(CHAT)
    with caplog.at_level("WARNING", logger="ziggurat.ingress"):
        app = OpenAIApp(bare, num_kv_blocks=64)
    assert any("no chat template" in r.getMessage() for r in caplog.records)

    async def fn(http, sdk):
        chat = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
        comp = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        return chat, comp

    try:
        chat, comp = app.run(fn)
    finally:
        app.close()
    assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
    assert comp.status_code == 200 and comp.json()["usage"]["completion_tokens"] == 3


def test_declared_tokens_dicts_and_generation_config(saved, tmp_path):
    def edit(d):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["bos_token"] = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
        n = Tokenizer(saved).vocab_size
        cfg.setdefault("added_tokens_decoder", {})[str(n)] = {"content": "<|tool|>", "special": True, "lstrip": False,
                                                              "rstrip": False, "normalized": False,
                                                              "single_word": False}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        (d / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [2, 5], "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 77,
             "do_sample": True}))
        c = json.loads((d / "config.json").read_text())
        c.pop("torch_dtype", None)
        c["dtype"] = "bfloat16"
        (d / "config.json").write_text(json.dumps(c))

    d = variant(saved, tmp_path / "declared", edit)
    tok = Tokenizer(d)
    n = Tokenizer(saved).vocab_size
    assert tok.bos_token == "<s>" and tok.bos_token_id == Tokenizer(saved).bos_token_id
    assert tok.encode("a<|tool|>b", add_special_tokens=False).count(n) == 1
    assert tok.decode([n], skip_special_tokens=True) == ""
    cfg = ModelConfig.from_dir(d)
    assert cfg.eos_token_ids == (2, 5) and cfg.dtype == torch.bfloat16
    assert sampling_defaults(d) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 77}
    p = parse_chat({"messages": CHAT}, sampling_defaults(d)).params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.9, 20, 77)
    p = parse_chat({"messages": CHAT, "temperature": 0, "top_k": 0, "max_tokens": 5}, sampling_defaults(d)).params
    assert (p.temperature, p.top_k, p.max_tokens) == (0.0, -1, 5)
    with LLM(str(d), dtype="float32", num_kv_blocks=32) as llm:
        assert llm.get_default_sampling_params().temperature == 0.6


def test_sharded_safetensors_with_and_without_an_index(saved, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(saved)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(saved / f, sharded / f)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    no_index = variant(sharded, tmp_path / "no-index", lambda d: (d / "model.safetensors.index.json").unlink())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for d in (saved, sharded, no_index):
        with LLM(str(d), dtype="float32", num_kv_blocks=32) as llm:
            outs.append(llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids)
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("tp", [1, 2])
def test_two_llms_in_turn_in_one_process(llama_dir, tp):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = LLM(str(llama_dir), tensor_parallel_size=tp, num_kv_blocks=64)
    a = first.generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    first.shutdown()
    first.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        first.generate([[1, 2, 3]], params)
    assert not multiprocessing.active_children()  # TP worker processes are gone
    with LLM(str(llama_dir), tensor_parallel_size=tp, num_kv_blocks=64) as second:
        b = second.generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    assert a == b
    assert not multiprocessing.active_children()
