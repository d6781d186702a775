"""Tokenizer, chat template and incremental detokenizer for HF-format directories.

Reads tokenizer.json (the `tokenizers` library) and tokenizer_config.json
(special tokens, chat_template). No transformers at run time.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    pass


def _token_str(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict):  # {"content": "<s>", ...} form
        return tok.get("content")
    return None


def _read_json(f: Path):
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{f}: not valid JSON ({e})") from None


def _named_templates(value, where: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {}
        for t in value:
            if not isinstance(t, dict) or not isinstance(t.get("template"), str):
                raise TokenizerError(f"{where}: chat_template: each entry of the list needs 'name' and 'template'")
            named[str(t.get("name", "default"))] = t["template"]
        if named and "default" not in named:
            named["default"] = next(iter(named.values()))
        return named
    raise TokenizerError(f"{where}: chat_template must be a string or a list of named templates")


def _find_chat_templates(path: Path, cfg: dict) -> tuple[dict[str, str], str | None]:
    """Where current and older transformers write the template, newest first:
    chat_template.jinja (plus additional_chat_templates/*.jinja), chat_template.json,
    tokenizer_config.json's chat_template."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        named = {"default": jinja.read_text(encoding="utf-8")}
        extra = path / "additional_chat_templates"
        if extra.is_dir():
            named.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra.glob("*.jinja"))})
        return named, jinja.name
    js = path / "chat_template.json"
    data = _read_json(js)
    if data is not None:
        value = data.get("chat_template") if isinstance(data, dict) else None
        return _named_templates(value, js), js.name
    named = _named_templates(cfg.get("chat_template"), path / "tokenizer_config.json")
    return named, ("tokenizer_config.json" if named else None)


def decoder_types(tok_json: dict) -> set[str]:
    """The decoder types of a tokenizer.json (a Sequence's members), e.g. {"ByteLevel"}."""
    dec = tok_json.get("decoder") or {}
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    return {d.get("type") for d in parts if isinstance(d, dict)}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the
    rest are shifted to code points from 256 up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in kept}
    shifted = (b for b in range(256) if b not in table)
    return table | {b: chr(256 + i) for i, b in enumerate(shifted)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """An HF directory's tokenizer.json + tokenizer_config.json, or a GGUF file's
    tokenizer metadata; and the chat templates either layout carries."""

    def __init__(self, path: str | Path):
        from ziggurat.models import gguf

        path = Path(path)
        try:
            gguf_file = gguf.find_gguf(path)
        except gguf.GGUFError as e:
            raise TokenizerError(str(e)) from None
        if gguf_file:
            self._init_gguf(gguf_file)
        else:
            self._init_hf(path)
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._compiled: dict[str, object] = {}
        self._max_token_bytes: int | None = None
        self._byte_level: bool | None = None

    def _init_gguf(self, file: Path) -> None:
        from ziggurat.models import gguf
        from ziggurat.models.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf

        try:
            parts = tokenizer_from_gguf(gguf.metadata(file), where=str(file))
        except (GGUFTokenizerError, gguf.GGUFError) as e:
            raise TokenizerError(str(e)) from None
        self._tok = parts.tokenizer
        self.bos_token, self.eos_token = parts.bos_token, parts.eos_token
        self.chat_templates = {"default": parts.chat_template} if parts.chat_template else {}
        self.template_source = f"{file.name} (tokenizer.chat_template)"

    def _init_hf(self, path: Path) -> None:
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj}: missing (ziggurat reads fast tokenizers from tokenizer.json)")
        try:
            self._tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot load tokenizer ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json") or {}
        self._add_declared_tokens(cfg.get("added_tokens_decoder"), path / "tokenizer_config.json")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.chat_templates, self.template_source = _find_chat_templates(path, cfg)

    def _add_declared_tokens(self, declared, where: Path) -> None:
        """tokenizer_config.json's added_tokens_decoder: tokens it declares that tokenizer.json lacks."""
        if not isinstance(declared, dict):
            return
        from tokenizers import AddedToken

        for tid, spec in sorted(declared.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
            content = _token_str(spec)
            if not content or self._tok.token_to_id(content) is not None:
                continue
            tok = AddedToken(content, single_word=bool(spec.get("single_word", False)), lstrip=bool(spec.get("lstrip")),
                             rstrip=bool(spec.get("rstrip")), normalized=bool(spec.get("normalized", False)),
                             special=bool(spec.get("special", False)))
            (self._tok.add_special_tokens if spec.get("special") else self._tok.add_tokens)([tok])
            got = self._tok.token_to_id(content)
            if str(got) != str(tid):
                raise TokenizerError(f"{where}: added_tokens_decoder declares {content!r} as id {tid}, but it "
                                     f"would get id {got}; tokenizer.json and tokenizer_config.json disagree")

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def template_for(self, tools: bool = False) -> str | None:
        """The template to render a conversation with: `tool_use` when tools are given and the model has one."""
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        return self.chat_template

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token can stand for (a bound for
        refusing texts too long to fit a context before tokenizing them)."""
        if self._max_token_bytes is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._max_token_bytes = max(16, max((len(t.encode("utf-8")) for t in vocab), default=16))
        return self._max_token_bytes

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Ids beyond the tokenizer's vocabulary (padded embedding rows) decode to nothing.
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        source = self.template_for(bool(kwargs.get("tools")))
        if not source:
            raise TokenizerError("this model has no chat template (chat_template.jinja, chat_template.json or "
                                 "tokenizer_config.json's chat_template); use completions instead")
        return self.render_template(source, messages, add_generation_prompt, **kwargs)

    def render_template(self, source: str, messages: list[dict], add_generation_prompt: bool = True,
                        **kwargs) -> str:
        """Render a conversation with the template `source` (the model's, or one the caller brings)."""
        if source not in self._compiled:
            self._compiled[source] = _compile_template(source)
        return self._compiled[source].render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for, as the tokenizer produced them: for byte-level
        BPE a token may hold part of a UTF-8 character, which decoding alone would turn
        into U+FFFD."""
        piece = self._tok.id_to_token(i) if 0 <= i < self.vocab_size else None
        if piece is None:
            return b""
        if self._byte_level is None:
            self._byte_level = "ByteLevel" in decoder_types(json.loads(self._tok.to_str()))
            self._added_ids = set(self._tok.get_added_tokens_decoder())
        if i in self._added_ids:  # added tokens are stored as their text
            return piece.encode("utf-8")
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:  # SentencePiece byte fallback: <0xE2>
            return bytes([int(m.group(1), 16)])
        # SentencePiece's word-boundary marker stands for a space.
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template writes special tokens (BOS included) itself.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Keeps two offsets into the ids: text is emitted only once decoding
    ids[prefix:] yields more than ids[prefix:read] and does not end in an
    incomplete UTF-8 sequence (U+FFFD), so a multi-byte character split over
    several byte-level tokens is never emitted half-formed. A few prompt
    tokens seed the window so tokenizers that strip a leading space decode
    the first token in context.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT :])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a request: whatever is held back (an incomplete character)."""
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        delta = after[len(before) :] if len(after) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


class TextStream:
    """One request's output text: incremental detokenization plus stop strings.

    `add(ids)` returns the new text delta that is safe to show. Text that
    could be the start of a stop string is held back until it is clear
    either way; once a stop string appears the stream is `stopped`, the text
    ends before it (or after it with include_stop_str), and `stop_reason`
    names it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens=True,
                 include_stop_str: bool = False):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stop = list(stop)
        self.include_stop = include_stop_str
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything decoded so far (maybe beyond a stop string)
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False
        self.stop_reason: str | None = None

    def add(self, ids: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += self.detok.add(ids)
        if final:
            self.text += self.detok.flush()
        if self.stop:
            # Only a stop string that ends in the new text can be new.
            start = max(0, self.emitted - self.hold)
            hits = [(self.text.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
                self.stopped, self.stop_reason = True, s
                final = True
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
