"""Tool calling through the official openai SDK and langchain-openai, on the real
small model (SmolLM2-135M-Instruct; the random tiny model when it is absent).

SmolLM2's chat template does not show tools to the model, so these runs use
tool_choice "required" or a named function, which the grammar enforces; the
"auto" path (a parser per model family finding calls in free text) is tested
on its own below, text chunk by text chunk as a stream delivers it.
"""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

from conftest import OpenAIApp  # noqa: E402
from ziggurat.actors.ingress.server import IngressConfig  # noqa: E402
from ziggurat.actors.ingress.tool_calls import (  # noqa: E402
    HermesParser, Llama3JsonParser, MistralParser, ToolRequest, ToolStream, parser_for)
from ziggurat.cluster.spec import packaged_default_model  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def app(llama_dir):
    app = OpenAIApp(packaged_default_model() or llama_dir, "m", num_kv_blocks=1024)
    yield app
    app.close()


@pytest.fixture
def sdk_run(app):
    """run(fn): await fn(sdk) against the app."""
    return lambda fn: app.run(lambda http, sdk: fn(sdk))


def check_weather_call(call):
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    return args


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(sdk_run, stream):
    named = {"type": "function", "function": {"name": "get_weather"}}

    async def fn(sdk):
        kw = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=60, temperature=0)
        if stream:
            async with sdk.chat.completions.stream(**kw) as s:  # the SDK assembles delta.tool_calls
                first = await s.get_final_completion()
        else:
            first = await sdk.chat.completions.create(**kw)
        msg = first.choices[0].message
        history = ASK + [
            {"role": "assistant", "content": msg.content, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in msg.tool_calls]},
            {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": json.dumps({"temperature": 21})},
        ]
        final = await sdk.chat.completions.create(model="m", messages=history, tools=[WEATHER, TIME], max_tokens=30,
                                                  temperature=0)
        return first, final

    first, final = sdk_run(fn)
    assert first.choices[0].finish_reason == "tool_calls"
    assert len(first.choices[0].message.tool_calls) == 1
    check_weather_call(first.choices[0].message.tool_calls[0])
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_required_picks_one_of_the_tools(sdk_run):
    async def fn(sdk):
        return await sdk.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                                 parallel_tool_calls=False, max_tokens=80, temperature=0)

    r = sdk_run(fn)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)


@pytest.mark.parametrize("extra,field", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_400s_naming_the_field(sdk_run, extra, field):
    async def fn(sdk):
        with pytest.raises(openai.BadRequestError) as e:
            await sdk.chat.completions.create(model="m", messages=ASK, max_tokens=5, extra_body=extra)
        return e.value

    assert sdk_run(fn).body["param"] == field


def test_langchain_bind_tools_and_structured_output(app):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """Current weather in a city"""

        city: str = Field(max_length=20)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    async def fn(http, sdk):
        llm = lc.ChatOpenAI(model="m", api_key="none", base_url="http://t/v1", http_async_client=http, temperature=0,
                            max_tokens=60, max_retries=0)
        called = await llm.bind_tools([Weather], tool_choice="Weather").ainvoke("Weather in Paris?")
        structured = await llm.with_structured_output(Weather, method="json_schema").ainvoke("Weather in Rome?")
        json_mode = await llm.with_structured_output(None, method="json_mode").ainvoke(
            'Reply in JSON: {"city": ..., "unit": ...} for Rome in celsius.')
        return called, structured, json_mode

    called, structured, json_mode = app.run(fn)
    assert called.tool_calls and called.tool_calls[0]["name"] == "Weather"
    assert set(called.tool_calls[0]["args"]) == {"city", "unit"}
    assert isinstance(structured, Weather)
    assert isinstance(json_mode, dict)


# -- the "auto" parsers, fed as a stream delivers text ------------------------------------------


def stream_through(parser, text: str, step: int = 3):
    ts = ToolStream(ToolRequest([WEATHER], "auto"), parser)
    streamed = "".join(ts.add(text[i:i + step]) for i in range(0, len(text), step))
    rest, calls = ts.finish()
    return streamed + rest, calls


@pytest.mark.parametrize("parser,text,content,n", [
    (HermesParser(), 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
                     '"celsius"}}\n</tool_call>', "Let me check.", 1),
    (HermesParser(), '<tool_call>{"name": "get_weather", "arguments": {"city": "A", "unit": "celsius"}}</tool_call>'
                     '<tool_call>{"name": "get_weather", "arguments": {"city": "B", "unit": "celsius"}}</tool_call>',
     "", 2),
    (Llama3JsonParser(), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     "", 1),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "A", "unit": "celsius"}}; '
                         '{"name": "get_weather", "parameters": {"city": "B", "unit": "celsius"}}', "", 2),
    (MistralParser(), 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
     "Sure.", 1),
    (HermesParser(), "No tools needed: it is sunny. <tool_ca", "No tools needed: it is sunny. <tool_ca", 0),
    (Llama3JsonParser(), "Plain answer {not json}", "Plain answer {not json}", 0),
])
def test_auto_parsers_on_streamed_text(parser, text, content, n):
    got, calls = stream_through(parser, text)
    assert got.strip() == content.strip()
    assert len(calls) == n
    for c in calls:
        assert c.name == "get_weather" and set(json.loads(c.arguments)) == {"city", "unit"}


def test_parser_chosen_from_the_template():
    assert parser_for("... {{ '<tool_call>' }} ...").name == "hermes"
    assert parser_for("... [TOOL_CALLS] ...").name == "mistral"
    assert parser_for("... <|python_tag|> ...").name == "llama3_json"
    assert parser_for(None, "mistral").name == "mistral"
    with pytest.raises(ValueError, match="unknown parser"):
        parser_for(None, "nope")


def test_an_unknown_parser_flag_fails_at_start_up():
    with pytest.raises(ValueError, match="tool_call_parser: unknown parser 'nope'"):
        IngressConfig(tool_call_parser="nope")
