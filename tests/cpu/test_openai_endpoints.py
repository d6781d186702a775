"""The auxiliary endpoints and the chat details real clients send (tiny model, in-process app).

/v1/models/{id} (the SDK's models.retrieve), /tokenize, /detokenize,
/v1/chat/completions/render, /version, /openapi.json (validated as OpenAPI 3)
and /docs; X-Request-Id kept, sanitized and echoed; content parts, names, the
developer role, max_completion_tokens, stop as string or list, user and
metadata; unknown fields ignored, wrong types refused.
"""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from conftest import OpenAIApp  # noqa: E402
from ziggurat.models.tokenizer import Tokenizer  # noqa: E402

CHAT = [{"role": "developer", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]


@pytest.fixture(scope="module")
def app(llama_dir):
    """run(fn): await fn(http, sdk) against the app."""
    app = OpenAIApp(llama_dir, num_kv_blocks=256, max_model_len=256)
    yield app.run
    app.close()


def test_models_retrieve_and_version(app):
    async def fn(http, sdk):
        m = await sdk.models.retrieve("tiny")
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("other")
        return m, (await http.get("/version")).json()

    m, version = app(fn)
    assert m.id == "tiny" and m.object == "model"
    from ziggurat import __version__

    assert version == {"version": __version__}


def test_tokenize_detokenize_and_render(app, llama_dir):
    tok = Tokenizer(llama_dir)

    async def fn(http, sdk):
        a = (await http.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})).json()
        b = (await http.post("/tokenize", json={"messages": CHAT})).json()
        c = (await http.post("/detokenize", json={"tokens": a["tokens"]})).json()
        r = (await http.post("/v1/chat/completions/render", json={"messages": CHAT})).json()
        bad = await http.post("/detokenize", json={"tokens": [1, 10**9]})
        bad2 = await http.post("/tokenize", json={})
        return a, b, c, r, bad, bad2

    a, b, c, r, bad, bad2 = app(fn)
    assert a["tokens"] == tok.encode("hello world") and a["count"] == len(a["tokens"]) and a["max_model_len"] == 256
    assert a["token_strs"] == [tok.id_to_token(i) for i in a["tokens"]]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "name": "ann", "content": "Hello there"}]
    assert b["tokens"] == tok.encode_chat(messages)
    assert c["prompt"] == tok.decode(a["tokens"], skip_special_tokens=False)
    assert r["prompt_token_ids"] == b["tokens"] and r["prompt"] == tok.apply_chat_template(messages)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert bad2.status_code == 400


def test_openapi_document_validates_and_docs_render(app):
    validator = pytest.importorskip("openapi_spec_validator")

    async def fn(http, sdk):
        return (await http.get("/openapi.json")).json(), await http.get("/docs")

    doc, docs = app(fn)
    validator.validate(doc)
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/models/{model}",
            "/version"} <= set(doc["paths"])
    chat = doc["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "response_format", "max_completion_tokens"} <= set(chat)
    assert docs.status_code == 200 and "/v1/chat/completions" in docs.text


def test_client_request_ids_are_kept_sanitized_and_echoed(app):
    async def fn(http, sdk):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        a = await http.post("/v1/completions", json=body, headers={"X-Request-Id": "gw-123 <x>"})
        b = await http.post("/v1/completions", json=body, headers={"X-Request-Id": "gw-123 <x>"})
        c = await http.post("/v1/completions", json=body)
        return a, b, c

    a, b, c = app(fn)
    assert a.headers["x-request-id"] == b.headers["x-request-id"] == "gw-123x"
    ours = {a.headers["x-ziggurat-request-id"], b.headers["x-ziggurat-request-id"]}
    assert len(ours) == 2 and all(r.startswith("gw-123x-") for r in ours)  # unique, linked to the gateway's
    assert a.json()["id"].endswith(a.headers["x-ziggurat-request-id"])
    assert len(c.headers["x-request-id"]) == 32 and "x-ziggurat-request-id" not in c.headers


def test_chat_details_clients_send(app, llama_dir):
    async def fn(http, sdk):
        r1 = await sdk.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=5, temperature=0,
                                               user="u-1", metadata={"k": "v"}, stop="zzz",
                                               extra_body={"some_future_field": {"x": 1}})
        r2 = await sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                               stop=["zzz", "yyy"])
        wrong = await http.post("/v1/chat/completions", json={"messages": CHAT, "temperature": "hot"})
        wrong2 = await http.post("/v1/chat/completions", json={"messages": CHAT, "user": 5})
        bias = await sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0,
                                                 logit_bias={"7": 100})
        bad_bias = await http.post("/v1/chat/completions", json={"messages": CHAT, "logit_bias": {"5": 500}})
        bad_bias2 = await http.post("/v1/chat/completions", json={"messages": CHAT, "logit_bias": {"99999999": 1}})
        return r1, r2, wrong, wrong2, (bias, bad_bias, bad_bias2)

    r1, r2, wrong, wrong2, bias = app(fn)
    assert r1.usage.completion_tokens == 5 and r1.choices[0].message.content == r2.choices[0].message.content
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "temperature"
    assert wrong2.status_code == 400 and wrong2.json()["error"]["param"] == "user"
    biased, bad_bias, bad_bias2 = bias
    # +100 on token 7: it wins every step
    assert biased.choices[0].message.content == Tokenizer(llama_dir).decode([7] * 4)
    assert bad_bias.status_code == 400 and bad_bias.json()["error"]["param"] == "logit_bias"
    assert bad_bias2.status_code == 400 and bad_bias2.json()["error"]["param"] == "logit_bias"

