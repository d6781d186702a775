"""Tokenizer, chat template and incremental detokenizer for HF-format directories.

Reads tokenizer.json (the `tokenizers` library) and tokenizer_config.json
(special tokens, chat_template). No transformers at run time.
"""

from __future__ import annotations

import json
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


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{tj}: missing (ziggurat reads fast tokenizers from tokenizer.json)")
        try:
            self._tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: cannot load tokenizer ({e})") from None
        cfg_file = path / "tokenizer_config.json"
        cfg = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file}: not valid JSON ({e})") from None
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._compiled_template = None
        self._max_token_bytes: int | None = None

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
        if not self.chat_template:
            raise TokenizerError("this model's tokenizer_config.json has no chat_template; use completions instead")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        return self._compiled_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

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
