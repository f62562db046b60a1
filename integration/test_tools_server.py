"""Tool calling through a real deployment server, driven by the real ``openai`` client.

The server is the ``tfx`` target's listener process on 127.0.0.1 over a tiny random Llama
whose chat template renders tools and whose ``model_config`` sets the ``hermes`` parser.
``required`` and named calls are the grammar's doing, so they must be valid from noise;
``auto`` answers the noise as content. Streamed tool-call deltas, joined, must equal the
non-streamed calls; each malformed request is a 400 naming its field.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import mlflow_tfx_plugin as tfx
from integration import servers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS},
    },
    {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {
                "type": "object",
                "properties": {"choice": {"enum": ["a", "b"]}},
                "required": ["choice"],
                "additionalProperties": False,
            },
        },
    },
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models
    import transformers

    base = tmp_path_factory.mktemp("tools")
    checkpoint = tiny_models.build_llama(base / "checkpoint")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(str(checkpoint))
    model_config = {"tool_call_parser": "hermes", "max_tokens": 60}
    tfx.save_model(checkpoint, base / "model", task="llm/v1/chat", model_config=model_config)
    with servers.openai_listener(base / "model", log=base / "server.log") as client:
        yield client


def _chat(client: openai.OpenAI, **request: Any) -> Any:
    request = {"messages": ASK, "tools": TOOLS, **request}
    return client.chat.completions.create(model="tiny", **request)


def _valid(call: Any) -> bool:
    arguments = json.loads(call.function.arguments)
    if call.function.name == "pick":
        return arguments in ({"choice": "a"}, {"choice": "b"})
    return (
        call.function.name == "get_weather"
        and set(arguments) == {"city", "days"}
        and isinstance(arguments["city"], str)
        and len(arguments["city"]) <= 6
        and arguments["days"] in range(1, 8)
    )


def test_required_calls_are_valid_over_seeds(client: openai.OpenAI):
    for seed in range(4):
        response = _chat(
            client, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed
        )
        [choice] = response.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
        assert _valid(call), call


def test_a_named_tool_gets_valid_arguments(client: openai.OpenAI):
    for seed in range(3):
        [choice] = _chat(client, tool_choice=NAMED, temperature=1.0, seed=seed).choices
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert choice.finish_reason == "tool_calls"
        assert _valid(call), call


def _joined(stream: Any) -> tuple[list[dict[str, Any]], str | None, str]:
    calls: dict[int, dict[str, Any]] = {}
    content, finishes = "", []
    for chunk in stream:
        if not chunk.choices:
            continue
        [choice] = chunk.choices
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or []:
            if piece.id is not None:
                assert piece.function.arguments == "" and piece.type == "function"
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:
                assert piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    [finish] = finishes
    return [calls[i] for i in sorted(calls)], content or None, finish


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_streamed_call_deltas_join_to_the_answer(client: openai.OpenAI, tool_choice: Any):
    request = {"tool_choice": tool_choice, "temperature": 0, "parallel_tool_calls": False}
    [choice] = _chat(client, **request).choices
    calls, content, finish = _joined(_chat(client, stream=True, **request))
    expected = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls] == expected
    assert all(c["id"].startswith("call_") for c in calls)
    assert content is None and finish == choice.finish_reason == "tool_calls"


def test_auto_and_none_answer_noise_as_content(client: openai.OpenAI):
    for tool_choice in ("auto", "none"):
        [choice] = _chat(client, tool_choice=tool_choice, temperature=0, max_tokens=8).choices
        assert not choice.message.tool_calls
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        calls, content, finish = _joined(
            _chat(client, tool_choice=tool_choice, temperature=0, max_tokens=8, stream=True)
        )
        assert (calls, content or "", finish) == ([], choice.message.content, choice.finish_reason)


def test_a_history_with_tool_results_is_accepted(client: openai.OpenAI):
    [first] = _chat(client, tool_choice=NAMED, temperature=0).choices
    [call] = first.message.tool_calls
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    [choice] = _chat(client, messages=history, temperature=0, max_tokens=4).choices
    assert isinstance(choice.message.content, str)


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "pick", "arguments": "{"},
                            }
                        ],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(
    client: openai.OpenAI, request_: dict[str, Any], param: str
):
    body = {"messages": ASK, "tools": TOOLS, **request_}
    body = {key: value for key, value in body.items() if value is not None}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="tiny", stream=stream, **body)
        error = raised.value.body
        assert isinstance(error, dict)
        assert error.get("param") == param, error
        assert f"'{param}'" in error["message"]
    assert _chat(client, max_tokens=2).choices, "the server still answers"
