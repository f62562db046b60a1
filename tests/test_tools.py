"""Tool calling in llm/v1/chat: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

``required`` and named tools are decoded under a grammar, so even random weights must call
a listed tool with arguments valid for its (bounded) schema. ``auto`` parses the model's own
format: the parsers are tested on text (whole, and streamed in every split), and the wiring
end to end with a runner whose output is fixed. Streams joined must equal the answer.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.generation import Completion, PromptResult, StreamDelta
from mlflow_tfx_plugin.protocol import ChatCompletionRequest, parse_request
from mlflow_tfx_plugin.structured.parsers import (
    ContentPiece,
    HermesFormat,
    Llama3JsonFormat,
    MarkerCallStream,
    NamedCallStream,
    ParsedCall,
    ParsedMessage,
    RequiredCallStream,
    assemble,
    parse,
)
from mlflow_tfx_plugin.structured.tools import history_for_template, required_schema
from mlflow_tfx_plugin.tasks.chat import ChatAdapter

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
#: A chat template that renders tools and tool-call history (Hermes-like).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "a={{ c.function.arguments.city }}</tool_call>{% endfor %}"
    "{% if m.tool_call_id %} id={{ m.tool_call_id }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _conforms(value: Any, schema: dict[str, Any]) -> bool:
    """The JSON Schema subset of these tools."""
    if "enum" in schema:
        return value in schema["enum"]
    if schema.get("type") == "object":
        properties = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and set(schema.get("required", ())) <= set(value) <= set(properties)
            and all(_conforms(value[key], properties[key]) for key in value)
        )
    if schema.get("type") == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if schema.get("type") == "integer":
        return isinstance(value, int) and schema["minimum"] <= value <= schema["maximum"]
    return False


def _valid_call(call: dict[str, Any], tools: list[dict[str, Any]] = TOOLS) -> bool:
    by_name = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    function = call["function"]
    return (
        call["type"] == "function"
        and call["id"].startswith("call_")
        and len(call["id"]) == len("call_") + 24
        and function["name"] in by_name
        and _conforms(json.loads(function["arguments"]), by_name[function["name"]])
    )


def test_the_call_validator_can_fail():
    good = {"id": "call_" + "0" * 24, "type": "function"}
    assert _valid_call({**good, "function": {"name": "add", "arguments": '{"a":1,"b":2}'}})
    for function in (
        {"name": "sub", "arguments": '{"a":1,"b":2}'},
        {"name": "add", "arguments": '{"a":1}'},
        {"name": "add", "arguments": '{"a":1,"b":200}'},
        {"name": "add", "arguments": '{"a":1,"b":2,"c":3}'},
        {"name": "get_weather", "arguments": '{"city":"Paris!!","unit":"c"}'},
    ):
        assert not _valid_call({**good, "function": function}), function


# -- parsers on text ------------------------------------------------------------------------

HERMES_CASES = [
    ("plain answer", ParsedMessage("plain answer")),
    (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        ParsedMessage(None, (ParsedCall("add", '{"a": 1, "b": 2}'),)),
    ),
    (
        'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '</tool_call>\n<tool_call>{"name": "add", "arguments": {}}</tool_call>',
        ParsedMessage(
            "Let me check.\n",
            (ParsedCall("get_weather", '{"city": "Paris"}'), ParsedCall("add", "{}")),
        ),
    ),
    (  # left open, but its JSON is complete (vLLM accepts it)
        '\n<tool_call>{"name": "add", "arguments": {"a": 1}}',
        ParsedMessage(None, (ParsedCall("add", '{"a": 1}'),)),
    ),
    ('Hi <tool_call>{"name": "add", "argu', ParsedMessage('Hi <tool_call>{"name": "add", "argu')),
    ("<tool_call>not json</tool_call>", ParsedMessage("<tool_call>not json</tool_call>")),
    (
        '<tool_call>{"arguments": {}}</tool_call>',
        ParsedMessage('<tool_call>{"arguments": {}}</tool_call>'),
    ),
    ("a <tool", ParsedMessage("a <tool")),
    ("   ", ParsedMessage("   ")),
]
LLAMA3_CASES = [
    ("The answer is 3.", ParsedMessage("The answer is 3.")),
    (
        '{"name": "add", "parameters": {"a": 1, "b": 2}}',
        ParsedMessage(None, (ParsedCall("add", '{"a": 1, "b": 2}'),)),
    ),
    (
        '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "add", "arguments": {}}',
        ParsedMessage(None, (ParsedCall("add", '{"a": 1}'), ParsedCall("add", "{}"))),
    ),
    (
        '{"name": "add", "parameters": {"a": 1}} trailing',
        ParsedMessage('{"name": "add", "parameters": {"a": 1}} trailing'),
    ),
    ('{"a": 1}', ParsedMessage('{"a": 1}')),
    ('  {"name": "add", "param', ParsedMessage('  {"name": "add", "param')),
    ("<|python_", ParsedMessage("<|python_")),
]


def _splits(text: str) -> Iterator[list[str]]:
    """The text whole, one character at a time, and in pieces of 2, 3 and 5."""
    yield [text]
    yield list(text)
    for size in (2, 3, 5):
        yield [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize(
    ("fmt", "text", "expected"),
    [(HermesFormat, *case) for case in HERMES_CASES]
    + [(Llama3JsonFormat, *case) for case in LLAMA3_CASES],
)
def test_marker_formats_parse_whole_and_streamed_alike(
    fmt: type, text: str, expected: ParsedMessage
):
    assert parse(MarkerCallStream(fmt()), text) == expected
    for pieces in _splits(text):
        stream = MarkerCallStream(fmt())
        events = [event for piece in pieces for event in stream.feed(piece)]
        assert assemble([*events, *stream.finish()]) == expected, pieces


def test_content_streams_before_a_call_begins():
    stream = MarkerCallStream(HermesFormat())
    assert assemble(stream.feed("Sure.")).content == "Sure."
    assert stream.feed(" <tool") == [ContentPiece(" ")], "a partial tag is held back"
    assert stream.feed('_call>{"name": "add", "arguments": {}}') == []
    assert assemble(stream.finish()).calls == (ParsedCall("add", "{}"),)


def test_required_array_streams_a_call_per_complete_element():
    text = '[{"name":"add","parameters":{"a":1,"b":2}},{"name":"get_weather","parameters":{}}]'
    expected = ParsedMessage(
        None, (ParsedCall("add", '{"a": 1, "b": 2}'), ParsedCall("get_weather", "{}"))
    )
    assert parse(RequiredCallStream(), text) == expected
    for pieces in _splits(text):
        stream = RequiredCallStream()
        events = [event for piece in pieces for event in stream.feed(piece)]
        assert assemble([*events, *stream.finish()]) == expected
    stream = RequiredCallStream()
    assert assemble(stream.feed(text[:44])).calls == (ParsedCall("add", '{"a": 1, "b": 2}'),)
    cut = '[{"name":"add","param'
    assert parse(RequiredCallStream(), cut) == ParsedMessage(cut), "no call: the text is content"


def test_named_stream_is_the_arguments():
    assert parse(NamedCallStream("add"), '{"a":1}') == ParsedMessage(
        None, (ParsedCall("add", '{"a":1}'),)
    )
    assert parse(NamedCallStream("add"), "") == ParsedMessage(None, (ParsedCall("add", ""),))


def test_required_schema_is_vllms_shape():
    schema = required_schema([ADD], parallel=False)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    [item] = schema["items"]["anyOf"]
    assert item["properties"]["name"] == {"const": "add"}
    assert item["properties"]["parameters"] == ADD["function"]["parameters"]
    assert "maxItems" not in required_schema([ADD], parallel=True)


def test_history_arguments_become_objects_for_templates():
    [message] = history_for_template(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "add", "arguments": '{"a": 1}'}}],
            }
        ]
    )
    assert message["content"] == ""
    assert message["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert message["tool_calls"][0]["type"] == "function"


# -- validation -----------------------------------------------------------------------------


def _history_call(arguments: str) -> dict[str, Any]:
    call = {"id": "c", "type": "function", "function": {"name": "a", "arguments": arguments}}
    return {"messages": [{"role": "assistant", "tool_calls": [call]}]}


BAD_REQUESTS = [
    (_history_call("[1]"), "messages.0.tool_calls.0.function.arguments"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
    ({"tools": [WEATHER, {"type": "web_search"}]}, "tools.1.type"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "tool_choice",
    ),
    ({"tools": TOOLS, "parallel_tool_calls": "sometimes"}, "parallel_tool_calls"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "a", "arguments": "{"}}
                    ],
                }
            ]
        },
        "messages.0.tool_calls.0.function.arguments",
    ),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_bad_tool_requests_are_400s_naming_the_field(body: dict[str, Any], param: str):
    with pytest.raises(InvalidInputError) as raised:
        parse_request(ChatCompletionRequest, {"messages": ASK, **body})
    assert raised.value.param == param
    assert f"'{param}'" in str(raised.value)


def test_tool_choice_defaults_and_constraints():
    def plan(**body: Any) -> Any:
        return parse_request(ChatCompletionRequest, {"messages": ASK, **body}).tool_plan()

    assert plan() is None
    assert plan(tool_choice="none") is None, "as vLLM, 'none' needs no tools"
    assert plan(tools=TOOLS).mode == "auto"
    assert plan(tools=TOOLS, tool_choice="none").constraint() is None
    assert plan(tools=TOOLS).constraint() is None
    named = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.mode == "named" and named.constraint().schema == ADD["function"]["parameters"]
    assert named.constraint().param == "tools.1.function.parameters"
    required = plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert required.constraint().schema == required_schema(TOOLS, parallel=False)


# -- constrained calls from noise --------------------------------------------------------------


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def chat_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    target = tmp_path_factory.mktemp(f"tools-{request.param}") / "model"
    checkpoint = request.getfixturevalue(f"tiny_{request.param}_dir")
    tfx.save_model(checkpoint, target, task="llm/v1/chat", model_config={"max_tokens": 80})
    return str(target)


@pytest.fixture(scope="module")
def predictor(chat_dir: str) -> Any:
    return tfx._load_pyfunc(chat_dir)


def _answer(predictor: Any, **request: Any) -> dict[str, Any]:
    response = predictor.predict({"messages": ASK, "tools": TOOLS, **request})
    [choice] = response["choices"]
    return choice


@pytest.mark.parametrize("temperature", [0.0, 1.3])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_valid_from_noise(predictor: Any, temperature: float, parallel: bool):
    finished = 0
    for seed in range(4):
        choice = _answer(
            predictor,
            tool_choice="required",
            parallel_tool_calls=parallel,
            temperature=temperature,
            seed=seed,
        )
        message = choice["message"]
        if choice["finish_reason"] == "length" and not message["tool_calls"]:
            continue  # cut inside the first call: its text is the content
        finished += choice["finish_reason"] == "tool_calls"
        assert choice["finish_reason"] in ("tool_calls", "length")
        assert message["content"] is None
        assert message["tool_calls"], "required: at least one call"
        assert parallel or len(message["tool_calls"]) == 1
        for call in message["tool_calls"]:  # complete calls, even when cut short later
            assert _valid_call(call), call
    # noise may keep adding calls to an unbounded array; one call completes quickly
    assert parallel or finished >= 2, "a bounded call completes well inside 80 tokens"


@pytest.mark.parametrize("name", ["get_weather", "add"])
def test_a_named_tool_is_called_with_valid_arguments_from_noise(predictor: Any, name: str):
    for seed in range(4):
        choice = _answer(
            predictor,
            tool_choice={"type": "function", "function": {"name": name}},
            temperature=1.3,
            seed=seed,
        )
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == name
        assert choice["message"]["content"] is None
        if choice["finish_reason"] != "length":
            assert choice["finish_reason"] == "tool_calls"
            assert _valid_call(call), call


def test_tool_choice_none_and_auto_without_a_parser_answer_content(predictor: Any):
    for choice_value in ("none", "auto"):
        choice = _answer(predictor, tool_choice=choice_value, temperature=0, max_tokens=8)
        assert choice["message"]["tool_calls"] is None
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")


def _joined_stream(predictor: Any, request: dict[str, Any]) -> tuple[str | None, list[Any], str]:
    """Content, calls and finish reason of a stream, joined as OpenAI clients do."""
    content, calls, finish = "", {}, ""
    for chunk in predictor.predict_stream({"messages": ASK, "tools": TOOLS, **request}):
        if not chunk["choices"]:
            continue
        [choice] = chunk["choices"]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for piece in delta.get("tool_calls") or []:
            if "id" in piece:
                assert piece["index"] not in calls, "one opening delta per call"
                assert piece["type"] == "function" and piece["function"]["arguments"] == ""
                calls[piece["index"]] = {**piece, "function": dict(piece["function"])}
            else:
                assert set(piece) == {"index", "function"}, piece
                calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
        finish = choice.get("finish_reason") or finish
    joined = [calls[index] for index in sorted(calls)]
    for call in joined:
        call.pop("index")
    return content or None, joined, finish


def _without_ids(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{k: v for k, v in call.items() if k != "id"} for call in calls or []]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_calls_join_to_the_answer(predictor: Any, tool_choice: Any):
    request = {"tool_choice": tool_choice, "temperature": 0}
    choice = _answer(predictor, **request)
    content, calls, finish = _joined_stream(predictor, request)
    assert calls and _without_ids(calls) == _without_ids(choice["message"]["tool_calls"])
    assert content == choice["message"]["content"] is None
    assert finish == choice["finish_reason"]


def test_pyfunc_signature_passes_tools_through(chat_dir: str):
    model = mlflow.pyfunc.load_model(chat_dir)  # with MLflow's schema enforcement
    request = {
        "messages": ASK,
        "tools": TOOLS,  # "maximum" in a parameter schema: MLflow's typed tools reject it
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "parallel_tool_calls": False,
        "temperature": 0,
    }
    [choice] = model.predict(request)["choices"]
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "add"
    chunks = list(model.predict_stream(request))
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    with pytest.raises(Exception, match="tool_choice"):
        model.predict({**request, "tool_choice": {"type": "function", "function": {"name": "x"}}})
    call_message = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": call["id"], "content": "3"}
    history = {**request, "messages": [*ASK, call_message, result], "tool_choice": "none"}
    [answer] = model.predict({**history, "max_tokens": 3})["choices"]
    assert isinstance(answer["message"]["content"], str)


def test_a_tool_schema_the_engine_cannot_enforce_is_a_400_naming_it(predictor: Any):
    tool = {
        "type": "function",
        "function": {"name": "tags", "parameters": {"type": "array", "uniqueItems": True}},
    }
    for tool_choice, param in (
        ("required", "tools"),
        ({"type": "function", "function": {"name": "tags"}}, "tools.0.function.parameters"),
    ):
        with pytest.raises(InvalidInputError) as raised:
            predictor.predict({"messages": ASK, "tools": [tool], "tool_choice": tool_choice})
        assert raised.value.param == param and "uniqueItems" in str(raised.value)
    [choice] = predictor.predict({"messages": ASK, "tools": [tool], "max_tokens": 2})["choices"]
    assert choice["message"]["tool_calls"] is None, "auto does not compile the schemas"


# -- auto: the model's own format ---------------------------------------------------------


class FixedRunner:
    """A runner whose every answer is ``text`` (what a model with that format would say)."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.tokenizer = tokenizer
        self.text = text
        self.prompts: list[str] = []

    def generate(self, prompts: list[str], params: Any, **kwargs: Any) -> list[PromptResult]:
        self.prompts += prompts
        completion = Completion(self.text, "stop", 9)
        return [PromptResult(3, [completion] * params.n) for _ in prompts]

    def stream(self, prompt: str, params: Any, **kwargs: Any) -> Iterator[StreamDelta]:
        self.prompts.append(prompt)
        for index in range(0, len(self.text), 3):
            yield StreamDelta(self.text[index : index + 3])
        yield StreamDelta("", "stop", 3, 9)


HERMES_ANSWER = (
    'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    '\n</tool_call><tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
)
LLAMA3_ANSWER = '{"name": "add", "parameters": {"a": 1, "b": 2}}'


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny tokenizer with a chat template that renders tools and their history."""
    import transformers

    target = tmp_path_factory.mktemp("tool-template")
    shutil.copytree(tiny_gpt2_dir, target, dirs_exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(target))
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def _adapter(tokenizer: Any, text: str, parser: str | None = "hermes") -> ChatAdapter:
    config = {"tool_call_parser": parser} if parser else {}
    return ChatAdapter(FixedRunner(tokenizer, text), model_config=config)


@pytest.mark.parametrize(
    ("text", "parser", "content", "names"),
    [
        (HERMES_ANSWER, "hermes", "Checking.", ["get_weather", "add"]),
        (LLAMA3_ANSWER, "llama3_json", None, ["add"]),
        ("No tools needed.", "hermes", "No tools needed.", []),
        (HERMES_ANSWER, None, HERMES_ANSWER, []),
    ],
)
def test_auto_parses_the_models_format(
    tool_tokenizer: Any, text: str, parser: str | None, content: str | None, names: list[str]
):
    adapter = _adapter(tool_tokenizer, text, parser)
    request = {"messages": ASK, "tools": TOOLS}
    [choice] = adapter.predict(request)["choices"]
    calls = choice["message"]["tool_calls"] or []
    assert choice["message"]["content"] == content
    assert [call["function"]["name"] for call in calls] == names
    assert all(_valid_call(call) for call in calls)
    assert choice["finish_reason"] == ("tool_calls" if names else "stop")
    streamed_content, streamed, finish = _joined_stream(adapter, request)
    assert (streamed_content, _without_ids(streamed), finish) == (
        content,
        _without_ids(calls),
        choice["finish_reason"],
    )
    assert all(call["id"].startswith("call_") for call in streamed)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "add", "arguments": "a=1"}</tool_call>',  # not JSON
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # not an object
    ],
)
def test_auto_arguments_that_are_not_a_json_object_stay_content(tool_tokenizer: Any, text: str):
    [choice] = _adapter(tool_tokenizer, text).predict({"messages": ASK, "tools": TOOLS})["choices"]
    assert choice["message"] == {"role": "assistant", "content": text, "tool_calls": None}


def test_a_named_call_cut_short_answers_its_partial_arguments(predictor: Any):
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = _answer(predictor, tool_choice=named, temperature=0, max_tokens=3)
    [call] = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "length"  # as OpenAI answers it: a prefix of the JSON
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"].startswith("{")


def test_auto_answers_are_not_parsed_for_tool_choice_none(tool_tokenizer: Any):
    adapter = _adapter(tool_tokenizer, HERMES_ANSWER)
    [choice] = adapter.predict({"messages": ASK, "tools": TOOLS, "tool_choice": "none"})["choices"]
    assert choice["message"] == {"role": "assistant", "content": HERMES_ANSWER, "tool_calls": None}
    assert "get_weather" in adapter.runner.prompts[-1], "the tools are still in the prompt"


def test_auto_without_parallel_calls_keeps_the_first(tool_tokenizer: Any):
    adapter = _adapter(tool_tokenizer, HERMES_ANSWER)
    request = {"messages": ASK, "tools": TOOLS, "parallel_tool_calls": False}
    [choice] = adapter.predict(request)["choices"]
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    _, streamed, _ = _joined_stream(adapter, request)
    assert _without_ids(streamed) == _without_ids(choice["message"]["tool_calls"])


def test_a_checkpoint_response_template_parses_auto(tool_tokenizer: Any):
    tool_tokenizer.response_template = {
        "start_anchor": "<|im_start|>assistant\n",
        "defaults": {"role": "assistant"},
        "fields": {
            "content": {"content": "text"},
            "tool_calls": {
                "open": "<tool_call>",
                "close": "</tool_call>",
                "content": "json",
                "repeats": True,
                "transform": {"type": "function", "function": "{content}"},
            },
        },
    }
    try:
        adapter = _adapter(tool_tokenizer, HERMES_ANSWER, parser=None)
        request = {"messages": ASK, "tools": TOOLS}
        [choice] = adapter.predict(request)["choices"]
        assert choice["message"]["content"] == "Checking."
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == [
            "get_weather",
            "add",
        ]
        assert json.loads(choice["message"]["tool_calls"][1]["function"]["arguments"]) == {
            "a": 1,
            "b": 2,
        }
        content, streamed, _ = _joined_stream(adapter, request)
        assert content == "Checking."
        assert _without_ids(streamed) == _without_ids(choice["message"]["tool_calls"])
    finally:
        tool_tokenizer.response_template = None


def test_an_unknown_tool_call_parser_is_named(tool_tokenizer: Any):
    adapter = _adapter(tool_tokenizer, HERMES_ANSWER, parser="xml")
    with pytest.raises(InvalidInputError, match="tool_call_parser"):
        adapter.predict({"messages": ASK, "tools": TOOLS})


def test_tool_history_is_rendered_by_the_chat_template(tool_tokenizer: Any):
    adapter = _adapter(tool_tokenizer, "It is sunny.")
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    [choice] = adapter.predict({"messages": history, "tools": TOOLS})["choices"]
    assert choice["message"]["content"] == "It is sunny."
    prompt = adapter.runner.prompts[-1]
    assert "Tools: get_weather add" in prompt
    assert "<tool_call>get_weather a=Paris</tool_call>" in prompt, "arguments as an object"
    assert "<|im_start|>tool\nsunny, 21 C id=call_1" in prompt


def test_a_chat_template_that_raises_is_a_400_naming_messages(tool_tokenizer: Any):
    tokenizer = copy.deepcopy(tool_tokenizer)
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    adapter = ChatAdapter(FixedRunner(tokenizer, "x"))
    with pytest.raises(InvalidInputError, match="roles must alternate") as caught:
        adapter.predict({"messages": ASK})
    assert caught.value.param == "messages"
