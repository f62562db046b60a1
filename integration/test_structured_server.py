"""``response_format`` through a real deployment server, driven by the real ``openai`` client.

The server is the ``tfx`` target's listener process on 127.0.0.1 over a tiny random Llama:
any JSON it answers is the grammar's doing. Streams joined must equal the non-streamed
answer at temperature 0, and each malformed request is a 400 naming its field.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

import mlflow_tfx_plugin as tfx
from integration import servers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Give me a point."}]
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "label": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["a", "b"]},
    },
    "required": ["x", "label", "kind"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    base = tmp_path_factory.mktemp("structured")
    checkpoint = tiny_models.build_llama(base / "checkpoint")
    tfx.save_model(checkpoint, base / "model", task="llm/v1/chat")
    with servers.openai_listener(base / "model", log=base / "server.log") as client:
        yield client


def _valid_point(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"x", "label", "kind"}
        and isinstance(value["x"], int)
        and -9 <= value["x"] <= 9
        and isinstance(value["label"], str)
        and len(value["label"]) <= 6
        and value["kind"] in ("a", "b")
    )


def _chat(client: openai.OpenAI, **request: Any) -> Any:
    request = {"max_tokens": 60, **request}
    return client.chat.completions.create(model="tiny", messages=HELLO, **request)


def test_json_schema_answers_validate_over_seeds(client: openai.OpenAI):
    for seed in range(4):
        response = _chat(client, temperature=1.0, seed=seed, response_format=JSON_SCHEMA)
        [choice] = response.choices
        assert choice.finish_reason == "stop"
        assert _valid_point(choice.message.content), choice.message.content


def test_json_object_answers_are_one_object(client: openai.OpenAI):
    response = _chat(client, temperature=0, response_format={"type": "json_object"})
    [choice] = response.choices
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    text = _chat(client, temperature=0, max_tokens=8, response_format={"type": "text"})
    free = _chat(client, temperature=0, max_tokens=8)
    assert text.choices[0].message.content == free.choices[0].message.content


def test_a_joined_stream_equals_the_answer_at_temperature_0(client: openai.OpenAI):
    answer = _chat(client, temperature=0, response_format=JSON_SCHEMA).choices[0]
    stream = _chat(client, temperature=0, response_format=JSON_SCHEMA, stream=True)
    chunks = list(stream)
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert joined == answer.message.content
    assert _valid_point(joined)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_take_response_format(client: openai.OpenAI):
    response = client.completions.create(
        model="tiny",
        prompt="A point:",
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": JSON_SCHEMA},
    )
    assert _valid_point(response.choices[0].text)


def test_concurrent_constrained_and_free_requests(client: openai.OpenAI):
    def one(index: int) -> tuple[bool, str]:
        constrained = index % 2 == 0
        extra = {"response_format": JSON_SCHEMA} if constrained else {}
        response = _chat(client, temperature=0.8, seed=index, **extra)
        return constrained, response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(8)))
    for constrained, content in answers:
        if constrained:
            assert _valid_point(content), content
    free = _chat(client, temperature=0, max_tokens=8).choices[0].message.content
    assert free == _chat(client, temperature=0, max_tokens=8).choices[0].message.content


@pytest.mark.parametrize(
    ("response_format", "param", "named"),
    [
        ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "p"}},
            "response_format.json_schema.schema",
            "is required",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"not": {}}}},
            "response_format.json_schema.schema",
            "'not'",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "array", "uniqueItems": True}},
            },
            "response_format.json_schema.schema",
            "'uniqueItems'",
        ),
        ({"type": "yaml"}, "response_format.type", "json_object"),
    ],
)
def test_bad_response_formats_are_400s_naming_the_field(
    client: openai.OpenAI, response_format: dict[str, Any], param: str, named: str
):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            _chat(client, response_format=response_format, stream=stream)
        error = raised.value.body
        assert isinstance(error, dict)
        assert error.get("param") == param
        assert named in error["message"]
    assert _chat(client, max_tokens=2).choices, "the server still answers"
