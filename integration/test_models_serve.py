"""The real ``mlflow models serve`` CLI serves a tfx model through the plugin's pyfunc loader."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from integration import servers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    return tiny_models.build_gpt2(tmp_path_factory.mktemp("ckpt") / "gpt2")


@pytest.fixture(scope="module")
def served_url(gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import mlflow_tfx_plugin as tfx

    target = tmp_path_factory.mktemp("saved") / "model"
    tfx.save_model(gpt2_checkpoint, target, model_config={"max_new_tokens": 3, "do_sample": False})
    with servers.models_serve(target, log=target.parent / "serve.log") as server:
        yield server.url


@pytest.fixture(scope="module")
def served_chat_url(
    gpt2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    import mlflow_tfx_plugin as tfx

    target = tmp_path_factory.mktemp("saved-chat") / "model"
    tfx.save_model(gpt2_checkpoint, target, task="llm/v1/chat", model_config={"max_tokens": 4})
    with servers.models_serve(target, log=target.parent / "serve.log") as server:
        yield server.url


def test_serve_predicts_text(served_url: str):
    response = requests.post(
        f"{served_url}/invocations", json={"inputs": ["Hello", "Paris is"]}, timeout=60
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    assert all(isinstance(text, str) for text in predictions)


def test_serve_params_override(served_url: str):
    short = requests.post(
        f"{served_url}/invocations",
        json={"inputs": ["Hello"], "params": {"max_new_tokens": 1}},
        timeout=60,
    ).json()["predictions"][0]
    longer = requests.post(
        f"{served_url}/invocations",
        json={"inputs": ["Hello"], "params": {"max_new_tokens": 6}},
        timeout=60,
    ).json()["predictions"][0]
    assert longer.startswith(short) and len(longer) > len(short)


def test_serve_bad_input_is_a_400(served_url: str):
    response = requests.post(
        f"{served_url}/invocations",
        json={"dataframe_split": {"columns": ["text"], "data": [[1.5]]}},
        timeout=60,
    )
    assert response.status_code == 400
    assert "error_code" in response.json()


def test_serve_chat_returns_one_completion_object(served_chat_url: str):
    body = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
    response = requests.post(f"{served_chat_url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["usage"]["completion_tokens"] == 4
    assert completion["choices"][0]["message"]["role"] == "assistant"


def test_serve_chat_bad_request_is_a_400(served_chat_url: str):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 0}
    response = requests.post(f"{served_chat_url}/invocations", json=body, timeout=60)
    assert response.status_code == 400
    assert "max_tokens" in response.json()["message"]


def test_serve_chat_passes_response_format_tools_and_logprobs_through(served_chat_url: str):
    """The chat signature declares them, so MLflow's scoring server hands them to the flavor."""
    pick = {
        "type": "object",
        "properties": {"k": {"enum": ["a", "b"]}},
        "required": ["k"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "pick", "parameters": pick}}
    ask = {"messages": [{"role": "user", "content": "Pick."}], "temperature": 0, "max_tokens": 30}
    bodies = {
        "json": {
            **ask,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": pick},
            },
        },
        "tool": {
            **ask,
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "pick"}},
        },
        "logprobs": {**ask, "logprobs": True, "top_logprobs": 2},
    }
    answers = {}
    for kind, body in bodies.items():
        response = requests.post(f"{served_chat_url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answers[kind] = response.json()["choices"][0]

    assert json.loads(answers["json"]["message"]["content"]) in ({"k": "a"}, {"k": "b"})
    [call] = answers["tool"]["message"]["tool_calls"]
    assert call["function"]["name"] == "pick"
    assert json.loads(call["function"]["arguments"]) in ({"k": "a"}, {"k": "b"})
    assert len(answers["logprobs"]["logprobs"]["content"]) > 0
