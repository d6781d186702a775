"""/openapi.json and /docs, generated from the request field tables the input checks use
(protocol.py: CHAT_FIELDS, COMPLETION_FIELDS, check_fields)."""

from __future__ import annotations

import html

from ziggurat.actors.ingress.protocol import CHAT_FIELDS, COMPLETION_FIELDS

_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}


def _schema(fields: dict, required: list[str]) -> dict:
    props = {}
    for name, (types, desc) in fields.items():
        t = types if isinstance(types, list) else [types]
        props[name] = ({"type": t[0]} if len(t) == 1 else {"anyOf": [{"type": x} for x in t]}) | (
            {"description": desc} if desc else {})
    return {"type": "object", "properties": props, "required": required, "additionalProperties": True}


def _body(ref: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _ok(desc: str, stream: bool = False) -> dict:
    content = {"application/json": {"schema": {"type": "object"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"200": {"description": desc, "content": content},
            "400": {"description": "invalid request", "content": {"application/json": {"schema": _ERROR}}},
            "401": {"description": "missing or bad API key", "content": {"application/json": {"schema": _ERROR}}},
            "429": {"description": "rate or quota limit", "content": {"application/json": {"schema": _ERROR}}}}


SIMPLE = {
    "TokenizeRequest": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "messages": {"type": "array"}, "add_special_tokens": {"type": "boolean"},
        "add_generation_prompt": {"type": "boolean"}, "return_token_strs": {"type": "boolean"},
        "model": {"type": "string"}}},
    "DetokenizeRequest": {"type": "object", "properties": {"tokens": {"type": "array", "items": {"type": "integer"}},
                                                           "model": {"type": "string"}}, "required": ["tokens"]},
}


def document(title: str, version: str, model: str) -> dict:
    paths = {
        "/v1/chat/completions": {"post": {"summary": "Chat completion (OpenAI)", "requestBody": _body("ChatRequest"),
                                          "responses": _ok("a chat.completion, or SSE chunks", True)}},
        "/v1/completions": {"post": {"summary": "Completion (OpenAI)", "requestBody": _body("CompletionRequest"),
                                     "responses": _ok("a text_completion, or SSE chunks", True)}},
        "/v1/chat/completions/render": {"post": {"summary": "The chat prompt as the template renders it, and its ids",
                                                 "requestBody": _body("ChatRequest"), "responses": _ok("rendered")}},
        "/v1/models": {"get": {"summary": "Served models", "responses": _ok("a list")}},
        "/v1/models/{model}": {"get": {"summary": "One served model", "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("a model"), "404": {"description": "no such model",
                                                    "content": {"application/json": {"schema": _ERROR}}}}}},
        "/tokenize": {"post": {"summary": "Token ids of a prompt or conversation (vLLM)",
                               "requestBody": _body("TokenizeRequest"), "responses": _ok("{count, max_model_len, tokens}")}},
        "/detokenize": {"post": {"summary": "Text of token ids (vLLM)", "requestBody": _body("DetokenizeRequest"),
                                 "responses": _ok("{prompt}")}},
        "/version": {"get": {"summary": "Server version", "responses": _ok("{version}")}},
        "/health": {"get": {"summary": "Replicas healthy", "responses": {"200": {"description": "ok"},
                                                                          "503": {"description": "unhealthy"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": f"OpenAI-compatible API serving '{model}'"},
        "paths": paths,
        "components": {"schemas": {"ChatRequest": _schema(CHAT_FIELDS, ["messages"]),
                                   "CompletionRequest": _schema(COMPLETION_FIELDS, ["prompt"]), **SIMPLE},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
    }


def docs_page(doc: dict) -> str:
    """A self-contained page (no CDN) listing every path and its request fields."""
    out = [f"<!doctype html><title>{html.escape(doc['info']['title'])}</title>",
           "<style>body{font:14px sans-serif;max-width:60em;margin:2em auto}code{background:#eee}</style>",
           f"<h1>{html.escape(doc['info']['title'])} {html.escape(doc['info']['version'])}</h1>",
           f"<p>{html.escape(doc['info']['description'])}. Machine-readable: <a href='/openapi.json'>/openapi.json</a></p>"]
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            out.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p>{html.escape(op['summary'])}</p>")
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
            if ref:
                props = schemas[ref.rsplit("/", 1)[1]]["properties"]
                out.append("<ul>" + "".join(
                    f"<li><code>{html.escape(k)}</code> {html.escape(v.get('description', ''))}</li>"
                    for k, v in props.items()) + "</ul>")
    return "\n".join(out)
