"""The OpenAI API's shapes: request parsing/validation and response building.

Plain Python (no Ray, no HTTP server), so tests drive it directly. Every
validation failure raises APIError, which the ingress turns into
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ziggurat.actors.ingress.tool_calls import ToolCallError, ToolRequest, forced_spec, parse_tools
from ziggurat.actors.scheduler.structured import GrammarSpec, StructuredOutputError, to_params
from ziggurat.sampling_params import SamplingParams, SamplingParamsError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# vLLM's extras accepted as extra body fields, besides OpenAI's own.
_EXTRA_SAMPLING = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
                   "skip_special_tokens", "include_stop_str_in_output")


@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completion"
    model: str | None
    prompts: list  # list of str | list[int] (completions) or one rendered chat prompt
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token (None: no logprobs)
    chat_logprobs: bool = False
    user: str | None = None
    messages: list = field(default_factory=list)
    cache_salt: str | None = None
    raw: dict = field(default_factory=dict)  # the body as sent (for request logs)
    grammar: GrammarSpec | None = None  # the structured-output constraint, as the request put it
    tools: ToolRequest | None = None  # chat: the tools offered and tool_choice
    return_token_ids: bool = False  # completions (vLLM extra): token_ids, prompt_token_ids per choice


# The request bodies' fields: JSON type and meaning. One table for the type check every
# request gets (check_fields) and for /openapi.json (openapi.py). Fields not listed are
# ignored, as OpenAI does.
_COMMON = {
    "model": ("string", "the served model name (optional)"),
    "n": ("integer", "samples per prompt"),
    "temperature": ("number", "0 is greedy"),
    "top_p": ("number", "nucleus sampling"),
    "top_k": ("integer", "vLLM extra: top-k (0 or -1 off)"),
    "min_p": ("number", "vLLM extra"),
    "seed": ("integer", "reproducible sampling"),
    "max_tokens": ("integer", "output tokens at most"),
    "min_tokens": ("integer", "vLLM extra: no stop before this many"),
    "stop": (["string", "array"], "stop strings (a string or up to 16)"),
    "stop_token_ids": ("array", "vLLM extra"),
    "ignore_eos": ("boolean", "vLLM extra"),
    "presence_penalty": ("number", ""),
    "frequency_penalty": ("number", ""),
    "repetition_penalty": ("number", "vLLM extra"),
    "logit_bias": ("object", "token id (as a string) -> bias in [-100, 100], added to its logit"),
    "stream": ("boolean", "server-sent events"),
    "stream_options": ("object", "{include_usage}"),
    "user": ("string", "end-user id (logged)"),
    "metadata": ("object", "kept with the request log"),
    "response_format": ("object", "{type: text | json_object | json_schema, json_schema: {name, schema, strict}}"),
    "guided_json": (["object", "string"], "vLLM extra: a JSON schema"),
    "guided_regex": ("string", "vLLM extra"),
    "guided_choice": ("array", "vLLM extra"),
    "guided_grammar": ("string", "vLLM extra: EBNF"),
    "structured_outputs": ("object", "vLLM extra: {json | regex | choice | grammar | json_object}"),
    "skip_special_tokens": ("boolean", "vLLM extra"),
    "include_stop_str_in_output": ("boolean", "vLLM extra"),
    "cache_salt": ("string", "isolates this request's prefix cache"),
}
CHAT_FIELDS = {
    "messages": ("array", "the conversation: {role, content (string or text parts), name, tool_calls, "
                          "tool_call_id}"),
    **_COMMON,
    "max_completion_tokens": ("integer", "output tokens at most (OpenAI's newer name)"),
    "logprobs": ("boolean", "return logprobs"),
    "top_logprobs": ("integer", "alternatives per token, 0-20"),
    "tools": ("array", "[{type: function, function: {name, description, parameters}}]"),
    "tool_choice": (["string", "object"], "auto | none | required | {type: function, function: {name}}"),
    "parallel_tool_calls": ("boolean", "more than one call per turn"),
}
COMPLETION_FIELDS = {
    "prompt": (["string", "array"], "text, token ids, or a list of either"),
    **_COMMON,
    "logprobs": ("integer", "alternatives per token, 0-20"),
    "echo": ("boolean", "not supported"),
    "best_of": ("integer", "only equal to n"),
    "return_token_ids": ("boolean", "vLLM extra: each choice carries its prompt_token_ids and token_ids (in a "
                                    "stream: prompt_token_ids on a choice's first chunk, each chunk's new token_ids)"),
}
_PY = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


def check_fields(body: dict, fields: dict) -> None:
    """Every listed field present (and not null) has its JSON type, or a 400 naming it."""
    for name, (types, _) in fields.items():
        v = body.get(name)
        if v is None:
            continue
        kinds = types if isinstance(types, list) else [types]
        py = tuple(t for k in kinds for t in (_PY[k] if isinstance(_PY[k], tuple) else (_PY[k],)))
        if (isinstance(v, bool) and "boolean" not in kinds) or not isinstance(v, py):
            raise bad(f"'{name}' must be {' or '.join(kinds)}, got {type(v).__name__}", name)


def _type(body: dict, name: str, types, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad(f"'{name}' must be {_names(types)}, got {v!r}", name)
    if not isinstance(v, types):
        raise bad(f"'{name}' must be {_names(types)}, got {type(v).__name__}", name)
    return v


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
                        dict: "an object"}.get(t, t.__name__) for t in types)


def grammar_spec(body: dict) -> GrammarSpec | None:
    try:
        return GrammarSpec.from_openai(body)
    except StructuredOutputError as e:
        raise bad(str(e), e.field) from None


def _sampling(body: dict, max_tokens: int | None, logprobs: int | None, defaults: dict | None,
              forced: GrammarSpec | None = None) -> SamplingParams:
    """defaults: the model's generation-config sampling defaults (models/config.py::sampling_defaults)."""
    d = defaults or {}
    kw = dict(
        n=_type(body, "n", int, 1),
        temperature=float(_type(body, "temperature", (int, float), d.get("temperature", 1.0))),
        top_p=float(_type(body, "top_p", (int, float), d.get("top_p", 1.0))),
        seed=_type(body, "seed", int),
        max_tokens=max_tokens,
        presence_penalty=float(_type(body, "presence_penalty", (int, float), 0.0)),
        frequency_penalty=float(_type(body, "frequency_penalty", (int, float), 0.0)),
        logprobs=logprobs,
    )
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("'stop' must be a string or an array of strings", "stop")
        if len(stop) > 16:
            raise bad("'stop' takes at most 16 strings", "stop")
        kw["stop"] = stop
    kw["structured_outputs"] = to_params(forced or grammar_spec(body))
    bias = body.get("logit_bias")
    if bias:  # OpenAI's keys are token ids as strings
        try:
            kw["logit_bias"] = {int(k): v for k, v in bias.items()}
        except (TypeError, ValueError):
            raise bad("'logit_bias' keys must be token ids", "logit_bias") from None
    for name in _EXTRA_SAMPLING:
        if body.get(name) is not None:
            kw[name] = body[name]
        elif name in d:
            kw[name] = d[name]
    if kw["max_tokens"] is None and "max_tokens" in d:
        kw["max_tokens"] = d["max_tokens"]
    if "top_k" in kw and kw["top_k"] == 0:
        kw["top_k"] = -1
    try:
        return SamplingParams(**kw)
    except SamplingParamsError as e:
        raise bad(str(e), e.field) from None
    except TypeError as e:
        raise bad(str(e)) from None


def _max_tokens(body: dict, *names, default) -> int | None:
    for name in names:
        if body.get(name) is not None:
            v = _type(body, name, int)
            if v < 1:
                raise bad(f"'{name}' must be at least 1, got {v}", name)
            return v
    return default


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return bool(opts.get("include_usage", False))


def parse_completion(body: dict, defaults: dict | None = None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
        isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)) for p in prompt
    ):
        prompts = list(prompt)
    else:
        raise bad("'prompt' must be a string, an array of strings, an array of token ids or an array of those", "prompt")
    if body.get("echo"):
        raise bad("'echo' is not supported", "echo")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise bad("'best_of' other than n is not supported", "best_of")
    lp = _type(body, "logprobs", int)
    if lp is not None and not 0 <= lp <= SamplingParams.MAX_LOGPROBS:
        raise bad(f"'logprobs' must be in [0, {SamplingParams.MAX_LOGPROBS}]", "logprobs")
    stream = bool(_type(body, "stream", bool, False))
    max_tokens = _max_tokens(body, "max_tokens", default=16)
    return ParsedRequest(
        kind="completion",
        model=_type(body, "model", str),
        prompts=prompts,
        params=_sampling(body, max_tokens, lp, defaults),
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=lp,
        user=_type(body, "user", str),
        cache_salt=_type(body, "cache_salt", str),
        raw=body,
        grammar=grammar_spec(body),
        return_token_ids=bool(_type(body, "return_token_ids", bool, False)),
    )


def _message_text(msg: dict, i: int) -> dict:
    """One message as the chat template sees it: role, text content, and for tool use
    the assistant's tool_calls (arguments as objects, as HF templates expect them), the
    tool message's tool_call_id, and `name`."""
    if not isinstance(msg, dict) or "role" not in msg:
        raise bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
    role = msg["role"]
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad(f"messages[{i}].role {role!r} is not one of system, developer, user, assistant, tool", f"messages[{i}].role")
    content = msg.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}]: only text parts are supported", f"messages[{i}].content")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content")
    out = {"role": "system" if role == "developer" else role, "content": content}
    if isinstance(msg.get("name"), str):
        out["name"] = msg["name"]
    if role == "tool":
        if not isinstance(msg.get("tool_call_id"), str):
            raise bad(f"messages[{i}]: a tool message needs 'tool_call_id'", f"messages[{i}].tool_call_id")
        out["tool_call_id"] = msg["tool_call_id"]
    calls = msg.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise bad(f"messages[{i}].tool_calls must be an array", f"messages[{i}].tool_calls")
        out["tool_calls"] = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad(f"messages[{i}].tool_calls[{j}] needs function.name", f"messages[{i}].tool_calls")
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                raise bad(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
                          f"messages[{i}].tool_calls") from None
            out["tool_calls"].append({"id": c.get("id"), "type": "function",
                                      "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_chat(body: dict, defaults: dict | None = None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages")
    msgs = [_message_text(m, i) for i, m in enumerate(messages)]
    try:
        tools = parse_tools(body)
    except ToolCallError as e:
        raise bad(str(e), e.field) from None
    forced = forced_spec(tools)
    if forced is not None and grammar_spec(body) is not None:
        raise bad("tool_choice 'required' or a named function cannot be combined with response_format or "
                  "guided decoding", "tool_choice")
    want_lp = bool(_type(body, "logprobs", bool, False))
    top = _type(body, "top_logprobs", int)
    if top is not None and not want_lp:
        raise bad("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    if top is not None and not 0 <= top <= SamplingParams.MAX_LOGPROBS:
        raise bad(f"'top_logprobs' must be in [0, {SamplingParams.MAX_LOGPROBS}]", "top_logprobs")
    lp = (top or 0) if want_lp else None
    stream = bool(_type(body, "stream", bool, False))
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens", default=None)
    return ParsedRequest(
        kind="chat",
        model=_type(body, "model", str),
        prompts=[],
        params=_sampling(body, max_tokens, lp, defaults, forced),
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=lp,
        chat_logprobs=want_lp,
        user=_type(body, "user", str),
        messages=msgs,
        cache_salt=_type(body, "cache_salt", str),
        raw=body,
        grammar=forced or grammar_spec(body),
        tools=tools,
    )


# -- responses ------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(entries: list[tuple[str, bytes, float, list[tuple[str, bytes, float]]]], offset: int) -> dict:
    """entries: (token text, token bytes, logprob, [(alt text, alt bytes, alt logprob), ...]) per token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, _, lp, top in entries:
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({t: v for t, _, v in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries: list[tuple[str, bytes, float, list[tuple[str, bytes, float]]]]) -> dict:
    def item(text, raw, lp):
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [dict(item(t, b, lp), top_logprobs=[item(*alt) for alt in top]) for t, b, lp, top in entries]}


def now() -> int:
    return int(time.time())
