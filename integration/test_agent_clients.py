"""Agent clients against a real deployment server: LangChain's ``ChatOpenAI``, and a chat
model logged by stock ``mlflow.transformers`` getting the same tools and JSON surface.

The servers are the ``tfx`` target's listener processes on 127.0.0.1 over tiny random Llamas:
every valid call or JSON object they answer is the grammar's doing, not the model's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import langchain_openai
import mlflow
import openai
import pytest
import transformers

from integration import servers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ASK = "What is the weather in Paris?"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER},
}


def _valid_weather(arguments: dict[str, Any]) -> bool:
    return (
        set(arguments) == {"city", "days"}
        and isinstance(arguments["city"], str)
        and len(arguments["city"]) <= 6
        and isinstance(arguments["days"], int)
        and 1 <= arguments["days"] <= 7
    )


def _tiny_llama(base: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    return tiny_models.build_llama(base / "checkpoint")


@pytest.fixture(scope="module")
def stock_logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """A chat model saved by stock ``mlflow.transformers``, served by the tfx listener."""
    base = tmp_path_factory.mktemp("stock-chat")
    pipe = transformers.pipeline("text-generation", model=str(_tiny_llama(base)))
    mlflow.transformers.save_model(
        pipe, base / "model", task="llm/v1/chat", pip_requirements=["transformers"]
    )
    with servers.openai_listener(base / "model", log=base / "server.log") as client:
        yield client


def test_langchain_chat_openai_binds_tools_and_structured_output(
    stock_logged: openai.OpenAI,
):
    chat = langchain_openai.ChatOpenAI(
        model="tiny",
        base_url=str(stock_logged.base_url),
        api_key=servers.TEST_API_KEY,
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )

    message = chat.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke(ASK)
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and _valid_weather(call["args"])

    structured = chat.with_structured_output(
        {"title": "weather", "description": "Weather.", **WEATHER}, method="json_schema"
    )
    assert _valid_weather(structured.invoke(ASK))


def test_a_stock_logged_chat_model_gets_tools_json_and_logprobs(stock_logged: openai.OpenAI):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    messages = [{"role": "user", "content": ASK}]

    answer = stock_logged.chat.completions.create(
        model="tiny", messages=messages, max_tokens=60, temperature=0, response_format=fmt
    )
    assert _valid_weather(json.loads(answer.choices[0].message.content or ""))

    called = stock_logged.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=60,
        temperature=0,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        logprobs=True,
        top_logprobs=2,
    )
    choice = called.choices[0]
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert _valid_weather(json.loads(call.function.arguments))
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.logprobs is not None and choice.logprobs.content
