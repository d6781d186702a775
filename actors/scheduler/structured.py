"""Structured output (JSON schema, regex, choice, EBNF) over xgrammar, without Ray.

GrammarSpec reads what a request asks for; GrammarCompiler turns it into a
CompiledGrammar for one tokenizer (cached); GrammarState follows one sequence
and fills its row of the token bitmask; the worker masks the logits with it
(models/sampler.py::apply_token_bitmask).
xgrammar is imported only when a grammar is compiled or applied.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ziggurat.models.tokenizer import bytes_to_unicode, decoder_types

if TYPE_CHECKING:
    import torch
    import xgrammar
    from ziggurat.models.tokenizer import Tokenizer

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarSpec",
    "GrammarState",
    "StructuredOutputError",
    "allocate_bitmask",
    "tokenizer_info",
]

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class StructuredOutputError(ValueError):
    """A request's structured-output field is malformed or cannot be compiled.
    `.field` is the top-level request field at fault (e.g. "response_format")."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _xgr():
    try:
        import xgrammar
    except ImportError as e:
        raise ImportError(f"structured output needs xgrammar (pip install xgrammar): {e}") from None
    return xgrammar


def _fail(path: str, message: str) -> StructuredOutputError:
    return StructuredOutputError(f"{path}: {message}", path.split(".")[0])


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks its output to match. Hashable: the compile cache key.

    value: for json_schema the schema as compact JSON text (key order kept: it is
    the order the properties are generated in); the regex; the EBNF grammar; a
    JSON list of the choices; "" for json_object. `source` is where in the
    request it came from (for error messages); it is not part of the key.
    """

    kind: str
    value: str
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GrammarSpec.kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @staticmethod
    def json_schema(schema: dict | str, source: str = "guided_json") -> GrammarSpec:
        return GrammarSpec("json_schema", _schema_text(schema, source), source)

    @staticmethod
    def from_openai(body: dict) -> GrammarSpec | None:
        """The constraint a chat/completions body asks for, or None.

        Reads OpenAI's response_format ({"type": "text" | "json_object" |
        "json_schema", "json_schema": {"name", "schema", "strict"}}), vLLM's
        guided_json / guided_regex / guided_choice / guided_grammar, and vLLM's
        structured_outputs {"json", "regex", "choice", "grammar", "json_object"}.
        At most one may be given."""
        found: list[GrammarSpec] = []
        rf = body.get("response_format")
        if rf is not None:
            spec = _from_response_format(rf)
            if spec is not None:
                found.append(spec)
        for key, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if body.get(key) is not None:
                found.append(_make(kind, body[key], key))
        so = body.get("structured_outputs")
        if so is not None:
            found.extend(_from_structured_outputs(so))
        if len(found) > 1:
            names = ", ".join(s.source for s in found)
            raise StructuredOutputError(f"only one structured-output constraint may be given; got {names}",
                                        found[1].source.split(".")[0])
        return found[0] if found else None


def _schema_text(schema: Any, path: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise _fail(path, f"a JSON schema must be an object, not {type(schema).__name__}")
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _make(kind: str, value: Any, path: str) -> GrammarSpec:
    if kind == "json_schema":
        return GrammarSpec("json_schema", _schema_text(value, path), path)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise _fail(path, "must be a non-empty list of strings")
        return GrammarSpec("choice", json.dumps(value, ensure_ascii=False), path)
    if not isinstance(value, str):
        raise _fail(path, f"must be a string, not {type(value).__name__}")
    if kind == "grammar" and not value.strip():
        raise _fail(path, "must not be empty")
    return GrammarSpec(kind, value, path)


def _from_response_format(rf: Any) -> GrammarSpec | None:
    if not isinstance(rf, dict):
        raise _fail("response_format", f"must be an object, not {type(rf).__name__}")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", "response_format")
    if kind != "json_schema":
        raise _fail("response_format.type", f"must be 'text', 'json_object' or 'json_schema', not {kind!r}")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise _fail("response_format.json_schema", "must be an object with a 'schema'")
    if "name" in js and not isinstance(js["name"], str):
        raise _fail("response_format.json_schema.name", "must be a string")
    if js.get("strict") is not None and not isinstance(js["strict"], bool):
        raise _fail("response_format.json_schema.strict", "must be a boolean")
    schema = js.get("schema")
    if schema is None:  # OpenAI allows leaving it out: any JSON object
        return GrammarSpec("json_object", "", "response_format")
    if not isinstance(schema, dict):
        raise _fail("response_format.json_schema.schema", f"must be an object, not {type(schema).__name__}")
    return GrammarSpec("json_schema", _schema_text(schema, "response_format.json_schema.schema"),
                       "response_format.json_schema.schema")


def _from_structured_outputs(so: Any) -> list[GrammarSpec]:
    if not isinstance(so, dict):
        raise _fail("structured_outputs", f"must be an object, not {type(so).__name__}")
    found = []
    for key, kind in (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar")):
        if so.get(key) is not None:
            found.append(_make(kind, so[key], f"structured_outputs.{key}"))
    jo = so.get("json_object")
    if jo is not None:
        if not isinstance(jo, bool):
            raise _fail("structured_outputs.json_object", "must be a boolean")
        if jo:
            found.append(GrammarSpec("json_object", "", "structured_outputs.json_object"))
    if so.get("structural_tag") is not None:
        raise _fail("structured_outputs.structural_tag", "is not supported")
    return found


# --- tokenizer -> xgrammar.TokenizerInfo -------------------------------------------------------

def tokenizer_info(tokenizer: Tokenizer, vocab_size: int,
                   stop_token_ids: list[int] | None = None) -> xgrammar.TokenizerInfo:
    """xgrammar's view of our tokenizer, from its tokenizers JSON (no transformers).

    The vocabulary type follows the decoder: ByteLevel -> BYTE_LEVEL, ByteFallback or
    Metaspace (SentencePiece) -> BYTE_FALLBACK, else RAW. Ids from the tokenizer's
    vocabulary up to the model's `vocab_size` (logits width) are kept; padded rows
    and special added tokens are left empty, which xgrammar never allows (stop
    tokens end a grammar all the same). Non-special added tokens are stored as text,
    so for byte-level vocabularies they are re-spelled in the byte alphabet."""
    xgr = _xgr()
    tok = tokenizer._tok
    spec = json.loads(tok.to_str())
    types = decoder_types(spec)
    if "ByteLevel" in types:
        vocab_type = xgr.VocabType.BYTE_LEVEL
    elif types & {"ByteFallback", "Metaspace"} or (spec.get("model") or {}).get("byte_fallback"):
        vocab_type = xgr.VocabType.BYTE_FALLBACK
    else:
        vocab_type = xgr.VocabType.RAW
    n = min(tokenizer.vocab_size, vocab_size)
    encoded: list[str] = [""] * vocab_size
    for i in range(n):
        encoded[i] = tok.id_to_token(i) or ""
    b2u = bytes_to_unicode() if vocab_type == xgr.VocabType.BYTE_LEVEL else None
    for i, added in tok.get_added_tokens_decoder().items():
        if i >= n:
            continue
        if added.special:
            encoded[i] = ""
        elif b2u is not None:
            encoded[i] = "".join(b2u[b] for b in added.content.encode("utf-8"))
    add_prefix_space = False
    if vocab_type != xgr.VocabType.RAW:
        first = tok.encode("a", add_special_tokens=False).tokens
        add_prefix_space = bool(first) and first[0].startswith(
            "\u2581" if vocab_type == xgr.VocabType.BYTE_FALLBACK else "\u0120")
    if stop_token_ids is None and tokenizer.eos_token_id is not None:
        stop_token_ids = [tokenizer.eos_token_id]
    return xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size, stop_token_ids=stop_token_ids,
                             add_prefix_space=add_prefix_space)


# --- compiling ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A grammar compiled for one tokenizer; shared by every sequence that uses it."""

    spec: GrammarSpec
    grammar: xgrammar.CompiledGrammar
    vocab_size: int
    compile_s: float

    @property
    def memory_bytes(self) -> int:
        return int(self.grammar.memory_size_bytes)


_XGR_MESSAGE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _xgr_message(e: Exception) -> str:
    return _XGR_MESSAGE.sub("", str(e).strip())


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer, caching the results (LRU, `cache_size`
    entries; a compile in progress is shared by every caller asking for it).

    JSON (schema or any object) is compact by default: no free whitespace between tokens,
    since small models otherwise spend their budget on newlines (seen with SmolLM2: 300
    tokens of "\n" in a string's place); vLLM offers the same switch as
    disable_any_whitespace. any_whitespace=True allows it, `max_whitespace` bounding each
    run (None: unbounded)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_threads: int = 4, *,
                 cache_size: int = 256, stop_token_ids: list[int] | None = None,
                 any_whitespace: bool = False, max_whitespace: int | None = None):
        xgr = _xgr()
        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        # Our own cache is the bounded one; xgrammar's would keep everything.
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._any_whitespace = any_whitespace
        self._max_whitespace = max_whitespace
        self._cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_threads), thread_name_prefix="grammar-compile")

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar; StructuredOutputError if the spec is invalid."""
        return self.compile_async(spec).result()

    def compile_async(self, spec: GrammarSpec) -> Future:
        """A Future of compile(spec), compiled on the compiler's threads."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:
                self._cache.move_to_end(spec)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[spec] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        fut.add_done_callback(lambda f: self._forget_unless_cacheable(spec, f))
        return fut

    def _forget_unless_cacheable(self, spec: GrammarSpec, fut: Future) -> None:
        # An invalid spec stays invalid; any other failure may not recur.
        err = fut.exception()
        if err is not None and not isinstance(err, StructuredOutputError):
            with self._lock:
                if self._cache.get(spec) is fut:
                    del self._cache[spec]

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        t0 = time.perf_counter()
        path = spec.source or spec.kind
        c = self._xgr
        json_kw: dict = {"any_whitespace": self._any_whitespace, "max_whitespace_cnt": self._max_whitespace}
        try:
            if spec.kind == "json_schema":
                grammar = c.compile_json_schema(spec.value, **json_kw)
            elif spec.kind == "json_object":
                grammar = c.compile_json_schema('{"type":"object"}', strict_mode=False, **json_kw)
            elif spec.kind == "regex":
                grammar = c.compile_regex(spec.value)
            elif spec.kind == "choice":
                choices = json.loads(spec.value)
                grammar = c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False)
                                                                     for s in choices))
            else:
                grammar = c.compile_grammar(spec.value)
        except RuntimeError as e:
            what = {"json_schema": "invalid or unsupported JSON schema", "regex": "invalid or unsupported regex",
                    "grammar": "invalid EBNF grammar"}.get(spec.kind, "cannot compile")
            raise _fail(path, f"{what}: {_xgr_message(e)}") from None
        return CompiledGrammar(spec, grammar, self.vocab_size, time.perf_counter() - t0)


# --- per-sequence state -------------------------------------------------------------------------

class GrammarState:
    """One sequence's position in its grammar. `accepted` lists the tokens accepted so
    far, enough to rebuild the state after preemption or on another replica."""

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self._matcher = _xgr().GrammarMatcher(compiled.grammar)
        self.accepted: list[int] = []

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar forbids it."""
        if not 0 <= token_id < self.compiled.vocab_size or not self._matcher.accept_token(int(token_id)):
            return False
        self.accepted.append(int(token_id))
        return True

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (rejected speculative tokens, say)."""
        if not 0 <= n <= len(self.accepted):
            raise ValueError(f"cannot roll back {n} tokens; {len(self.accepted)} accepted")
        if n:
            self._matcher.rollback(n)
            del self.accepted[-n:]

    def is_terminated(self) -> bool:
        """Whether the grammar has accepted a stop token (nothing more may follow)."""
        return self._matcher.is_terminated()

    def is_completed(self) -> bool:
        """Whether the output so far is a complete match (a stop token may come next)."""
        return self._matcher.is_completed()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the tokens allowed next into bitmask[row] (int32, CPU). Returns False
        when every token is allowed (the row need not be applied). Once terminated,
        only the stop tokens are allowed."""
        if self._matcher.is_terminated():
            bitmask[row].zero_()
            for t in self._matcher.stop_token_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
            return True
        return bool(self._matcher.fill_next_token_bitmask(bitmask, row))

    def copy(self) -> GrammarState:
        """An independent state at the same position (n > 1, forks)."""
        new = GrammarState.__new__(GrammarState)
        new.compiled = self.compiled
        new._matcher = self._matcher.fork()
        new.accepted = list(self.accepted)
        return new

    @staticmethod
    def rebuild(compiled: CompiledGrammar, accepted: list[int]) -> GrammarState:
        """The state after accepting `accepted` from the start; ValueError if the grammar
        rejects one of them."""
        state = GrammarState(compiled)
        for i, t in enumerate(accepted):
            if not state.accept(t):
                raise ValueError(f"token {t} (position {i}) is not allowed by the grammar there")
        return state


# --- bitmasks ----------------------------------------------------------------------------------

def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    import torch

    """An int32 CPU bitmask [batch, ceil(vocab_size / 32)], every token allowed."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a (signed) int32 value."""
    return (1 << i) - (1 << 32 if i == 31 else 0)


def to_params(spec: GrammarSpec | None):
    """The SamplingParams field for a parsed constraint (None passes through)."""
    from ziggurat.sampling_params import StructuredOutputsParams

    if spec is None:
        return None
    if spec.kind == "json_schema":
        return StructuredOutputsParams(json=spec.value)
    if spec.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if spec.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(spec.value))
    return StructuredOutputsParams(**{spec.kind: spec.value})
