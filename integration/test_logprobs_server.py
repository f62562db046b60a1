"""``logprobs`` through a real deployment server, driven by the real ``openai`` client.

The server is the ``tfx`` target's listener process on 127.0.0.1 over a tiny random Llama.
The client parses every answer into its own types (``ChatCompletionTokenLogprob``, the
legacy ``Logprobs``); streams joined must carry the non-streamed logprobs, greedy's token is
always the top one, and a malformed request is a 400 naming its field.
"""

from __future__ import annotations

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
HELLO = [{"role": "user", "content": "Say something."}]
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
    "required": ["x"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    base = tmp_path_factory.mktemp("logprobs")
    checkpoint = tiny_models.build_llama(base / "checkpoint")
    tfx.save_model(checkpoint, base / "model", task="llm/v1/chat")
    with servers.openai_listener(base / "model", log=base / "server.log") as client:
        yield client


def _chat(client: openai.OpenAI, **request: Any) -> Any:
    request = {"max_tokens": 12, "temperature": 0, **request}
    return client.chat.completions.create(model="tiny", messages=HELLO, **request)


def _complete(client: openai.OpenAI, **request: Any) -> Any:
    request = {"max_tokens": 12, "temperature": 0, **request}
    return client.completions.create(model="tiny", prompt="Once upon a time", **request)


def test_chat_logprobs_have_openais_shape_and_greedy_picks_the_top_token(client: openai.OpenAI):
    [choice] = _chat(client, logprobs=True, top_logprobs=4).choices
    content = choice.logprobs.content
    assert content, "one entry per token"
    for entry in content:
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert -9999.0 <= entry.logprob <= 0.0
        assert bytes(entry.bytes or []).decode("utf-8", errors="replace") == entry.token
    assert "".join(entry.token for entry in content).strip() == choice.message.content.strip()

    [plain] = _chat(client).choices
    assert plain.logprobs is None
    assert plain.message.content == choice.message.content, "logprobs do not change greedy"
    [bare] = _chat(client, logprobs=True).choices
    assert all(entry.top_logprobs == [] for entry in bare.logprobs.content)


def test_a_joined_chat_stream_carries_the_answers_logprobs(client: openai.OpenAI):
    [choice] = _chat(client, logprobs=True, top_logprobs=2).choices
    chunks = list(_chat(client, logprobs=True, top_logprobs=2, stream=True))
    streamed = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert joined == choice.message.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in choice.logprobs.content]
    assert sum(bool(c.choices and c.choices[0].logprobs) for c in chunks) > 1


def test_completions_answer_the_legacy_logprobs(client: openai.OpenAI):
    [choice] = _complete(client, logprobs=3).choices
    logprobs = choice.logprobs
    assert logprobs.tokens and len(logprobs.tokens) == len(logprobs.text_offset)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert top[token] == value == max(top.values()), "greedy picks the top token"
        assert len(top) <= 4

    chunks = list(_complete(client, logprobs=3, stream=True))
    joined: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].logprobs:
            for key, values in joined.items():
                values.extend(getattr(chunk.choices[0].logprobs, key))
    assert joined == {key: getattr(logprobs, key) for key in joined}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_logprobs_with_a_stop_string_end_at_the_cut(client: openai.OpenAI):
    [free] = _complete(client, logprobs=0).choices
    offset = free.logprobs.text_offset[3]
    stop = free.text[offset : offset + 2]
    [cut] = _complete(client, logprobs=0, stop=[stop]).choices
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert len(cut.logprobs.tokens) < len(free.logprobs.tokens)
    assert all(start < len(cut.text) for start in cut.logprobs.text_offset)
    assert cut.logprobs.tokens == free.logprobs.tokens[: len(cut.logprobs.tokens)]


def test_logprobs_under_a_schema_and_beside_plain_requests(client: openai.OpenAI):
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT}}

    def one(index: int) -> Any:
        extra: dict[str, Any] = {"logprobs": True, "top_logprobs": 5} if index % 2 else {}
        if index % 3 == 0:
            extra["response_format"] = schema
        return index, _chat(client, max_tokens=20, **extra).choices[0]

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, range(6)))
    for index, choice in answers:
        assert (choice.logprobs is not None) == bool(index % 2)
        if choice.logprobs is not None:
            for entry in choice.logprobs.content:
                assert entry.top_logprobs[0].token == entry.token
                assert all(top.logprob > -9999.0 for top in entry.top_logprobs)


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_bad_logprobs_fields_are_400s_naming_the_field(
    client: openai.OpenAI, route: str, fields: dict[str, Any], param: str
):
    call = _chat if route == "chat" else _complete
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            call(client, stream=stream, **fields)
        error = raised.value.body
        assert isinstance(error, dict)
        assert error.get("param") == param
        assert f"'{param}'" in error["message"]
    assert _chat(client, max_tokens=2).choices, "the server still answers"
