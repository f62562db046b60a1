"""``response_format``: constrained decoding makes even random weights answer valid JSON.

Tiny random-weight models produce noise, so any valid output is the grammar's doing. The
schemas are bounded (``maximum``, ``maxLength``, ``enum``, ``maxItems``): an unbounded
number or string from noise runs to ``max_tokens`` (``finish_reason: "length"``, the only
way an output may be incomplete).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.deployments.engine import EngineSettings, create_generation_engine
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.generation import PromptResult, TextGenerator
from mlflow_tfx_plugin.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationParams,
    parse_request,
)
from mlflow_tfx_plugin.structured import INSTALL_HINT, ConstraintSpec

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "maximum": 9, "minimum": -9},
        "ok": {"type": "boolean"},
    },
    "required": ["x", "ok"],
    "additionalProperties": False,
}
PROMPTS = ["Hello", "Describe a person as JSON:", "{"]
HELLO = [{"role": "user", "content": "Give me a person."}]


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` validates against the JSON Schema subset these tests use."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        if not isinstance(value, dict) or not set(schema.get("required", ())) <= set(value):
            return False
        if schema.get("additionalProperties") is False and not set(value) <= set(properties):
            return False
        return all(conforms(value[key], sub) for key, sub in properties.items() if key in value)
    if kind == "array":
        return (
            isinstance(value, list)
            and len(value) <= schema.get("maxItems", len(value))
            and all(conforms(item, schema.get("items", {})) for item in value)
        )
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema.get("minimum", value) <= value <= schema.get("maximum", value)
        )
    if kind == "boolean":
        return isinstance(value, bool)
    return kind is None


def test_the_validator_can_fail():
    assert conforms({"name": "ab", "age": 3, "mood": "sad", "tags": [True]}, PERSON)
    for bad in (
        {"name": "abcdefghi", "age": 3, "mood": "sad", "tags": []},
        {"name": "a", "age": 121, "mood": "sad", "tags": []},
        {"name": "a", "age": 1, "mood": "ok", "tags": []},
        {"name": "a", "age": 1, "mood": "sad", "tags": [True, True, False]},
        {"name": "a", "age": 1, "mood": "sad"},
        {"name": "a", "age": 1, "mood": "sad", "tags": [], "extra": 1},
    ):
        assert not conforms(bad, PERSON), bad


def assert_valid(completion: Any, schema: dict[str, Any]) -> None:
    """Complete output validates; only ``length`` may cut it short."""
    if completion.finish_reason == "length":
        return
    assert completion.finish_reason == "stop"
    value = json.loads(completion.text)
    assert conforms(value, schema), completion.text


def _schema(schema: dict[str, Any]) -> ConstraintSpec:
    return ConstraintSpec.json_schema(schema, param="response_format.json_schema.schema")


def _load(path: Path) -> TextGenerator:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(str(path)))


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama_sp"])
def generator(request: pytest.FixtureRequest) -> TextGenerator:
    path = request.getfixturevalue(f"tiny_{request.param}_dir")
    return _load(path)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> TextGenerator:
    return _load(tiny_llama_dir)


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_json_schema_output_validates_from_noise(generator: TextGenerator, temperature: float):
    spec = _schema(PERSON)
    stopped = 0
    for seed in range(3):
        params = GenerationParams(
            max_tokens=60, temperature=temperature, n=2, seed=seed, constraint=spec
        )
        for result in generator.generate(PROMPTS, params):
            for completion in result.completions:
                assert_valid(completion, PERSON)
                stopped += completion.finish_reason == "stop"
    assert stopped >= 9, "a bounded schema completes well inside 60 tokens"


def test_json_object_output_is_one_object(generator: TextGenerator):
    spec = ConstraintSpec.json_object(param="response_format")
    for seed in range(3):
        params = GenerationParams(max_tokens=40, temperature=1.0, seed=seed, constraint=spec)
        for result in generator.generate(PROMPTS, params):
            [completion] = result.completions
            if completion.finish_reason == "stop":
                assert isinstance(json.loads(completion.text), dict), completion.text


def test_free_text_is_not_json_without_a_constraint(llama: TextGenerator):
    """The model alone does not make JSON: the guarantee comes from the grammar."""
    [result] = llama.generate(["Hello"], GenerationParams(max_tokens=20, temperature=0))
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.completions[0].text)


def test_rows_of_one_batch_keep_their_own_constraint(llama: TextGenerator):
    params = GenerationParams(max_tokens=40, temperature=0)
    mixed = llama.generate(PROMPTS, params, constraints=[_schema(PERSON), None, _schema(POINT)])
    plain = llama.generate(PROMPTS, params)

    assert_valid(mixed[0].completions[0], PERSON)
    assert_valid(mixed[2].completions[0], POINT)
    assert set(json.loads(mixed[2].completions[0].text)) == {"x", "ok"}
    assert mixed[1].completions[0] == plain[1].completions[0], "the free row is plain greedy"


def test_streaming_a_constrained_choice_joins_to_the_generated_one(generator: TextGenerator):
    params = GenerationParams(max_tokens=60, temperature=0, constraint=_schema(PERSON))
    [result] = generator.generate(["Hello"], params)
    events = list(generator.stream("Hello", params))

    assert "".join(event.text for event in events) == result.completions[0].text
    assert events[-1].finish_reason == result.completions[0].finish_reason
    assert events[-1].completion_tokens == result.completions[0].completion_tokens


def test_seeded_sampling_under_a_grammar_is_reproducible(llama: TextGenerator):
    params = GenerationParams(max_tokens=60, temperature=1.2, seed=11, constraint=_schema(PERSON))
    first = llama.generate(["Hello"], params)
    assert llama.generate(["Hello"], params) == first


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": 3}},
            "response_format.json_schema.schema",
        ),
        ({"type": "xml"}, "response_format.type"),
        ("json", "response_format"),
    ],
)
def test_malformed_response_formats_are_400s_naming_the_field(response_format: Any, param: str):
    for model, body in (
        (ChatCompletionRequest, {"messages": HELLO}),
        (CompletionRequest, {"prompt": "Hi"}),
    ):
        with pytest.raises(InvalidInputError) as raised:
            parse_request(model, {**body, "response_format": response_format})
        assert raised.value.param == param
        assert param in str(raised.value)


def test_response_formats_build_their_constraints():
    def constraint(response_format: dict[str, Any]) -> ConstraintSpec | None:
        body = {"messages": HELLO, "response_format": response_format}
        return parse_request(ChatCompletionRequest, body).generation_params().constraint

    assert constraint({"type": "text"}) is None
    assert constraint({"type": "json_object"}) == ConstraintSpec.json_object(
        param="response_format"
    )
    spec = constraint({"type": "json_schema", "json_schema": {"name": "p", "schema": POINT}})
    assert spec is not None and spec.kind == "json_schema" and spec.schema == POINT
    assert list(spec.schema["properties"]) == ["x", "ok"], "property order is the schema's"


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"type": "string", "format": "hostname-foo"}, "hostname-foo"),
        ({"type": "strin"}, "strin"),
    ],
)
def test_schemas_the_engine_cannot_enforce_are_400s_naming_the_keyword(
    llama: TextGenerator, schema: dict[str, Any], named: str
):
    with pytest.raises(InvalidInputError) as raised:
        llama.generate(["Hi"], GenerationParams(max_tokens=4, constraint=_schema(schema)))
    assert raised.value.param == "response_format.json_schema.schema"
    assert named in str(raised.value)


def test_without_the_extra_a_constrained_request_is_a_400_naming_it(
    llama: TextGenerator, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now fails
    spec = _schema({"type": "object", "properties": {"never": {"type": "null"}}})
    with pytest.raises(InvalidInputError) as raised:
        llama.generate(["Hi"], GenerationParams(max_tokens=4, constraint=spec))
    assert INSTALL_HINT in str(raised.value)
    assert raised.value.param == "response_format.json_schema.schema"
    [free] = llama.generate(["Hi"], GenerationParams(max_tokens=4))  # the rest still works
    assert free.completions


# -- engines --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["continuous", "micro"])
def engine(request: pytest.FixtureRequest, llama: TextGenerator):
    settings = EngineSettings(max_batch_size=4, max_tokens_limit=80)
    built = create_generation_engine(llama, settings, continuous=request.param == "continuous")
    yield built
    built.close()


def test_constrained_and_free_requests_share_an_engine(engine, llama: TextGenerator):
    free = GenerationParams(max_tokens=12, temperature=0)
    person = GenerationParams(max_tokens=60, temperature=0, constraint=_schema(PERSON))
    point = GenerationParams(max_tokens=60, temperature=1.0, constraint=_schema(POINT))
    jobs = [("Hello", free), ("Hello", person), ("Once", point), ("Once", free), ("x", person)]

    async def run() -> list[PromptResult]:
        calls = [engine.generate(p, params, add_special_tokens=True) for p, params in jobs]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(run())
    for (prompt, params), result in zip(jobs, results, strict=True):
        [completion] = result.completions
        if params.constraint is None:
            assert result == llama.generate([prompt], params)[0]
        else:
            assert_valid(completion, params.constraint.schema)


def test_an_engine_stream_under_a_grammar_equals_its_completion(engine):
    params = GenerationParams(max_tokens=60, temperature=0, constraint=_schema(PERSON))

    async def run() -> tuple[str, PromptResult]:
        pieces = [e.text async for e in engine.stream("Hello", params, add_special_tokens=True)]
        return "".join(pieces), await engine.generate("Hello", params, add_special_tokens=True)

    streamed, result = asyncio.run(run())
    assert streamed == result.completions[0].text
    assert_valid(result.completions[0], PERSON)


def test_a_bad_schema_fails_only_its_own_request_in_an_engine(engine):
    free = GenerationParams(max_tokens=6, temperature=0)
    bad = GenerationParams(max_tokens=6, constraint=_schema({"not": {"type": "string"}}))

    async def run() -> list[Any]:
        calls = [engine.generate("Hi", params, add_special_tokens=True) for params in (bad, free)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    failed, answered = asyncio.run(run())
    assert isinstance(failed, InvalidInputError) and "'not'" in str(failed)
    assert isinstance(answered, PromptResult)


# -- pyfunc -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_path(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    target = tmp_path_factory.mktemp("structured-chat") / "model"
    tfx.save_model(tiny_gpt2_dir, target, task="llm/v1/chat", model_config={"max_tokens": 60})
    return str(target)


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def test_pyfunc_chat_passes_response_format_through_its_signature(chat_path: str):
    model = mlflow.pyfunc.load_model(chat_path)  # with MLflow's schema enforcement
    for seed in range(3):
        request = {"messages": HELLO, "temperature": 1.0, "seed": seed}
        response = model.predict({**request, "response_format": _json_schema(PERSON)})
        [choice] = response["choices"]
        if choice["finish_reason"] == "stop":
            assert conforms(json.loads(choice["message"]["content"]), PERSON)
    response = model.predict({"messages": HELLO, "response_format": {"type": "json_object"}})
    [choice] = response["choices"]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_pyfunc_chat_stream_joins_to_the_completion(chat_path: str):
    model = mlflow.pyfunc.load_model(chat_path)
    request = {"messages": HELLO, "temperature": 0, "response_format": _json_schema(POINT)}
    content = model.predict(request)["choices"][0]["message"]["content"]
    chunks = list(model.predict_stream(request))
    joined = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert joined == content
    assert conforms(json.loads(content), POINT)


def test_pyfunc_completions_take_response_format(tiny_llama_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_llama_dir, tmp_path / "model", task="llm/v1/completions")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    request = {"prompt": "A point:", "max_tokens": 40, "temperature": 0}
    response = model.predict({**request, "response_format": _json_schema(POINT)})
    [choice] = response["choices"]
    assert choice["finish_reason"] == "stop"
    assert conforms(json.loads(choice["text"]), POINT)
