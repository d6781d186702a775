"""Tool calling: the request's tools and tool_choice, and tool calls parsed out of the text.

- `parse_tools(body)` checks `tools`, `tool_choice` and `parallel_tool_calls` (errors
  name the field).
- `tool_choice: "required"` or a named function is enforced by a grammar
  (`forced_spec`): the model writes JSON that can only be a call (a named
  function: its arguments; required: a list of {"name", "arguments"}), which
  `ToolStream` turns into calls.
- `tool_choice: "auto"`: the model decides; a parser per model family finds its
  calls in the text: `hermes` (Hermes, Qwen 2.5/3: <tool_call>{...}</tool_call>),
  `llama3_json` (Llama 3.x: {"name": ..., "parameters": {...}}, optionally after
  <|python_tag|>, several joined by ";"), `mistral` ([TOOL_CALLS][{...}]). The
  parser comes from a flag or is recognised in the chat template.
- `ToolStream` is one sample's text on its way out: content is streamed until a
  call may have begun, then held; at the end the calls (if any) are returned
  for `delta.tool_calls` / `message.tool_calls`, with finish_reason "tool_calls".
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ziggurat.actors.scheduler.structured import GrammarSpec


class ToolCallError(ValueError):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict]  # as sent: [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: str  # "auto" | "none" | "required" | "function"
    function: str | None = None  # the named function (choice == "function")
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def parameters(self, name: str) -> dict:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)


_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def parse_tools(body: dict) -> ToolRequest | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ToolCallError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolCallError("'tools' must be an array of function tools", "tools")
    if not tools:
        return None
    seen = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise ToolCallError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolCallError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'", "tools")
        if name in seen:
            raise ToolCallError(f"{where}.function.name {name!r} is given twice", "tools")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolCallError(f"{where}.function.parameters must be a JSON schema object", "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolCallError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    tools = [{"type": "function", "function": t["function"]} for t in tools]
    if choice is None or choice in ("auto", "none", "required"):
        return ToolRequest(tools, choice or "auto", None, parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in seen:
            raise ToolCallError(f"tool_choice names function {name!r}, which is not in 'tools'", "tool_choice")
        return ToolRequest(tools, "function", name, parallel)
    raise ToolCallError("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def forced_spec(tr: ToolRequest | None) -> GrammarSpec | None:
    """The grammar that makes the output a call, for tool_choice required or named."""
    if tr is None or tr.choice not in ("required", "function"):
        return None
    if tr.choice == "function":
        return GrammarSpec.json_schema(tr.parameters(tr.function), "tool_choice")
    call = [{"type": "object", "properties": {"name": {"enum": [n]}, "arguments": tr.parameters(n)},
             "required": ["name", "arguments"], "additionalProperties": False} for n in tr.names]
    schema = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
    if not tr.parallel:
        schema["maxItems"] = 1
    return GrammarSpec.json_schema(schema, "tool_choice")


# -- parsers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text


def _call(obj) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    name = "base"
    markers: tuple[str, ...] = ()  # text that begins a call

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """(content outside the calls, calls); ([text], []) when there are none."""
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text):
        calls = []
        for m in self._RE.finditer(text):
            try:
                c = _call(json.loads(m.group(1)))
            except json.JSONDecodeError:
                c = None
            if c is None:
                return text, []
            calls.append(c)
        if not calls:
            return text, []
        return text[: text.find("<tool_call>")].strip(), calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def parse(self, text):
        body = text.strip()
        body = body.removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in body.split(";"):
            try:
                c = _call(json.loads(part))
            except json.JSONDecodeError:
                return text, []
            if c is None:
                return text, []
            calls.append(c)
        return "", calls


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def parse(self, text):
        i = text.find("[TOOL_CALLS]")
        if i < 0:
            return text, []
        try:
            items = json.loads(text[i + len("[TOOL_CALLS]"):].strip())
        except json.JSONDecodeError:
            return text, []
        items = items if isinstance(items, list) else [items]
        calls = [_call(x) for x in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return text[:i].strip(), calls


PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for(template: str | None, flag: str | None = None) -> ToolParser:
    """The flag's parser, else the one the chat template's syntax names (hermes by default)."""
    if flag:
        if flag not in PARSERS:
            raise ValueError(f"tool_call_parser: unknown parser {flag!r}; known: {', '.join(PARSERS)}")
        return PARSERS[flag]()
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return MistralParser()
    if "<tool_call>" in t:
        return HermesParser()
    if "<|python_tag|>" in t or "ipython" in t:
        return Llama3JsonParser()
    return HermesParser()


def forced_calls(tr: ToolRequest, text: str) -> list[Call]:
    """Calls from a grammar-forced output (see forced_spec)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []  # cut short (max_tokens): no call
    if tr.choice == "function":
        return [Call(tr.function, json.dumps(data, ensure_ascii=False))]
    return [c for c in (_call(x) for x in data) if c is not None]


def call_json(calls: list[Call], with_index: bool = False) -> list[dict]:
    out = []
    for i, c in enumerate(calls):
        d = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": i, **d} if with_index else d)
    return out


class ToolStream:
    """One sample's text: `add(delta)` returns the content safe to stream now; `finish()`
    returns (content still held, calls)."""

    def __init__(self, tr: ToolRequest, parser: ToolParser):
        self.tr, self.parser = tr, parser
        self.forced = tr.choice in ("required", "function")
        self.text = ""
        self.sent = 0  # chars of text streamed as content
        self.holding = self.forced

    def add(self, delta: str) -> str:
        self.text += delta
        if self.holding or self.tr.choice == "none":
            return "" if self.holding else self._release(len(self.text))
        starts = [self.text.find(m, self.sent) for m in self.parser.markers]
        starts = [i for i in starts if i >= 0]
        if self.parser.name == "llama3_json":  # a call is the whole output: only at its start
            starts = [i for i in starts if not self.text[:i].strip()]
        if starts:
            self.holding = True
            return self._release(min(starts))
        # Keep back what could be the beginning of a marker.
        keep = max((k for m in self.parser.markers for k in range(1, len(m)) if self.text.endswith(m[:k])), default=0)
        if self.parser.name == "llama3_json" and not self.text.strip():
            keep = len(self.text)
        return self._release(len(self.text) - keep)

    def _release(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[Call]]:
        if self.tr.choice == "none":
            return self._release(len(self.text)), []
        if self.forced:
            calls = forced_calls(self.tr, self.text)
            return ("", calls) if calls else (self._release(len(self.text)), [])
        content, calls = self.parser.parse(self.text)
        if not calls:
            return self._release(len(self.text)), []
        rest = content[self.sent:] if content.startswith(self.text[: self.sent]) else ""
        return rest, calls
