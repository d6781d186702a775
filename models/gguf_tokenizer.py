"""A `tokenizers.Tokenizer`, special tokens and chat template rebuilt from GGUF metadata.

A GGUF file has no tokenizer.json: llama.cpp stores the vocabulary, merges, token types
and special-token ids as `tokenizer.ggml.*` metadata. We build the fast tokenizer that
transformers' GGUF loader builds from the same keys, with two deliberate differences,
both following llama.cpp and the models' own tokenizer.json:

- pre-types whose llama.cpp pre-tokenizer splits every digit first (`smollm`,
  `starcoder`, ...) get that split; transformers drops it, which changes the tokens only
  where two or more whitespace characters come before a digit;
- a sentencepiece vocabulary whose file says `add_space_prefix = false` gets no "▁"
  prefix (transformers always adds one).

Only `gpt2` (byte-level BPE) and `llama` (sentencepiece BPE) vocabularies are supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from ziggurat.models.tokenizer import bytes_to_unicode


class GGUFTokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFTokenizerParts:
    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


SUPPORTED_MODELS = ("gpt2", "llama")

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-types llama.cpp splits as `\p{N}` first, then GPT-2's regex.
DIGIT_SPLIT_PRE_TYPES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-types with their own split regex; any other pre-type gets GPT-2's (ByteLevel's own).
_SPLIT_REGEXES = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}

# Architectures whose sentencepiece tokenizer differs from Llama's in ways we do not rebuild.
_UNSUPPORTED_SPM_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


def tokenizer_from_gguf(metadata: dict, where: str = "") -> GGUFTokenizerParts:
    """The tokenizer a GGUF file's metadata describes; `where` (its path) names it in errors."""
    where = where or "GGUF metadata"
    model = _require(metadata, "tokenizer.ggml.model", where)
    tokens = _require(metadata, "tokenizer.ggml.tokens", where)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFTokenizerError(f"{where}: tokenizer.ggml.tokens is not a list of strings")
    types = metadata.get("tokenizer.ggml.token_type") or []

    if model == "gpt2":
        tok = _byte_level(metadata, tokens, where)
    elif model == "llama":
        arch = metadata.get("general.architecture")
        if arch in _UNSUPPORTED_SPM_ARCHS:
            raise GGUFTokenizerError(
                f"{where}: the sentencepiece tokenizer of architecture {arch!r} is not supported"
            )
        tok = _sentencepiece(metadata, tokens, arch, where)
    else:
        raise GGUFTokenizerError(
            f"{where}: tokenizer model {model!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )

    ids = {
        name: _special_id(metadata, f"tokenizer.ggml.{key}", len(tokens), where)
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("unk", "unknown_token_id"), ("pad", "padding_token_id"))
    }
    specials = {name: None if i is None else tokens[i] for name, i in ids.items()}
    _add_tokens(tok, tokens, types, byte_level=model == "gpt2", named=[t for t in specials.values() if t])

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama")) and ids["bos"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    tok.post_processor = _template(
        (specials["bos"], ids["bos"]) if add_bos else None, (specials["eos"], ids["eos"]) if add_eos else None
    )

    template = metadata.get("tokenizer.chat_template", metadata.get("tokenizer.chat_template.default"))
    return GGUFTokenizerParts(
        tokenizer=tok,
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        pad_token=specials["pad"],
        unk_token=specials["unk"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=template if isinstance(template, str) else None,
    )


def _require(metadata: dict, key: str, where: str):
    if key not in metadata:
        raise GGUFTokenizerError(f"{where}: missing metadata key {key}")
    return metadata[key]


def _special_id(metadata: dict, key: str, vocab_size: int, where: str) -> int | None:
    token_id = metadata.get(key)
    if token_id is not None and (not isinstance(token_id, int) or not 0 <= token_id < vocab_size):
        raise GGUFTokenizerError(f"{where}: {key} = {token_id!r} is not a token id (vocabulary of {vocab_size})")
    return token_id


def _byte_level(metadata: dict, tokens: list[str], where: str) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written in plain text (outside the byte alphabet) is respelled byte by byte.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in _require(metadata, "tokenizer.ggml.merges", where)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    pre = metadata.get("tokenizer.ggml.pre")
    if pre in DIGIT_SPLIT_PRE_TYPES:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _SPLIT_REGEXES:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(metadata: dict, tokens: list[str], arch: str | None, where: str) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        scores = _require(metadata, "tokenizer.ggml.scores", where)
        if len(scores) != len(tokens):
            raise GGUFTokenizerError(f"{where}: {len(scores)} tokenizer.ggml.scores for {len(tokens)} tokens")
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    if arch == "phi3":  # the prefix comes from a normalizer: "  hi" -> "▁▁▁hi", not "▁▁hi"
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend(prepend="▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False
        )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best-scored token first; ties go
    to the longer left, then the longer right piece (transformers' order)."""
    ranked = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked += [(left, right, score) for left, right in pairs]
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_tokens(tok: Tokenizer, tokens: list[str], types: list[int], byte_level: bool, named: list[str]) -> None:
    """Control tokens become special added tokens and user-defined ones plain added tokens, so
    they match whole in text; the named special tokens are marked special too. Nothing is added
    that is not already in the vocabulary under its own spelling."""
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    # The transformers classes add their default special tokens (when in the vocabulary).
    defaults = ["<|endoftext|>"] if byte_level else ["<unk>", "<s>", "</s>"]
    vocab = tok.get_vocab(with_added_tokens=False)
    special = list(dict.fromkeys(t for t in control + defaults + named if t in vocab))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    done = set(special)
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab and t not in done]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _template(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """transformers' post-processor: BOS and/or EOS around each sequence."""
    head = [bos[0]] if bos else []
    tail = [eos[0]] if eos else []
    single = " ".join([f"{t}:0" for t in head] + ["$A:0"] + [f"{t}:0" for t in tail])
    pair = " ".join([single] + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t])
