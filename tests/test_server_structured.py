"""Structured output and tool calls through the official ``openai`` client on the embedded model: ``response_format``
``json_schema`` answers that validate against the schema (20 prompts, sampled), ``json_object``, vLLM's ``guided_*``
fields, ``tools`` with ``tool_choice`` ``required`` / named / ``auto`` as ``tool_calls`` whose arguments validate
against the function's schema, streamed and not; bad constraints are 400s."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from server_process import launch_hf_paged

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client():
    args = ["--served-model-name", "smollm2", "--disable-access-log", "--log-level", "warning"]
    with launch_hf_paged(args, start_timeout=180) as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
    assert server.returncode == 0, server.log_tail()


def validate(value, schema: dict) -> None:
    """The subset of JSON Schema these tests use (object, properties, required, additionalProperties, string with
    enum / maxLength, integer with bounds)."""
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict)
        assert set(schema.get("required", [])) <= set(value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"])
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub)
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
        assert value in schema.get("enum", [value])
    elif kind == "integer":
        assert isinstance(value, int) and schema.get("minimum", value) <= value <= schema.get("maximum", value)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_json_schema_answers_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(i: int) -> str:
        return client.chat.completions.create(model="smollm2", messages=ask(f"Invent person number {i}."),
                                              response_format=fmt, max_tokens=80, temperature=0.8,
                                              seed=i).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(20) as pool:  # one running batch
        answers = list(pool.map(one, range(20)))
    for answer in answers:
        validate(json.loads(answer), PERSON)


def test_json_object_guided_fields_and_streaming(client):
    for seed in range(3):
        chat = client.chat.completions.create(model="smollm2", messages=ask('Reply with exactly this JSON: {"ok": true}'),
                                              response_format={"type": "json_object"}, max_tokens=40,
                                              temperature=0.7, seed=seed)
        assert chat.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
    choice = client.completions.create(model="smollm2", prompt="The best color is", max_tokens=5, n=3,
                                       temperature=1.0, extra_body={"guided_choice": ["red", "green", "blue"]})
    assert {c.text for c in choice.choices} <= {"red", "green", "blue"}
    regex = client.completions.create(model="smollm2", prompt="A year:", max_tokens=8, temperature=0,
                                      extra_body={"guided_regex": r"(19|20)\d\d"})
    assert len(regex.choices[0].text) == 4 and regex.choices[0].text[:2] in ("19", "20")
    stream = client.chat.completions.create(model="smollm2", messages=ask("A person, please."), stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "p", "schema": PERSON}},
                                            max_tokens=80, temperature=0)
    validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), PERSON)


def test_bad_constraints_are_400(client):
    for extra in ({"guided_regex": "(unclosed"}, {"guided_choice": []},
                  {"guided_json": {"type": "object"}, "guided_regex": "a+"},
                  {"structured_outputs": {"nonsense": 1}}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2", prompt="x", max_tokens=4, extra_body=extra)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=ask("x"), tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls_validate(client, stream):
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        kwargs = dict(model="smollm2", messages=ask("What's the weather in Paris, and the time in Tokyo?"),
                      tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120, temperature=0)
        if stream:
            calls: dict[int, dict] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    entry = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
                    entry["name"] += delta_call.function.name or ""
                    entry["arguments"] += delta_call.function.arguments or ""
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            found = list(calls.values())
        else:
            message = client.chat.completions.create(**kwargs).choices[0]
            finish = message.finish_reason
            found = [{"name": c.function.name, "arguments": c.function.arguments}
                     for c in message.message.tool_calls or []]
        assert found, choice
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
        for call in found:
            validate(json.loads(call["arguments"]), schemas[call["name"]])
        if choice == "required":
            assert finish == "tool_calls"
        else:
            assert [c["name"] for c in found] == ["get_time"] and finish == "stop"


def test_auto_tool_calls_are_parsed_and_plain_answers_stream(client):
    """``auto``: the Hermes prompt is added (SmolLM2's template renders no tools); a reply that is a call becomes
    ``tool_calls``, a reply that is not stays content, streamed; a multi-turn conversation with the call and its
    result renders."""
    messages = ask("Call get_weather for Paris in celsius.")
    first = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], max_tokens=60,
                                           temperature=0).choices[0]
    if first.message.tool_calls:
        assert first.finish_reason == "tool_calls"
        validate(json.loads(first.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
        call = first.message.tool_calls[0]
    else:
        call = None
    chunks = list(client.chat.completions.create(model="smollm2", messages=ask("Tell me a short story about a dog."), tools=[WEATHER],
                                                 max_tokens=24, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    if call is not None:
        follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                             {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
        answer = client.chat.completions.create(model="smollm2", messages=follow, tools=[WEATHER], max_tokens=20,
                                                temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_structured_rows_do_not_change_unconstrained_ones(client):
    """Constrained and free requests in one batch: the free ones give the same text as alone."""
    base = client._client.base_url  # noqa: SLF001 - the server's URL
    url = str(base).rstrip("/")
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    alone = httpx.post(url + "/completions", json=body, timeout=120).json()["choices"][0]["text"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(client.completions.create, model="smollm2", prompt=f"JSON {i}:", max_tokens=40,
                                   temperature=0.7, seed=i, extra_body={"guided_json": PERSON}) for i in range(4)]
        free = [pool.submit(httpx.post, url + "/completions", json=body, timeout=120) for _ in range(2)]
        for f in constrained:
            text = f.result().choices[0].text
            if f.result().choices[0].finish_reason == "stop":
                validate(json.loads(text), PERSON)
        assert [f.result().json()["choices"][0]["text"] for f in free] == [alone, alone]
