"""Malformed and hostile bodies against one real deployment server process: never a 5xx.

One ``python -m mlflow_tfx_plugin.deployments.listener`` process (the tiny chat model, on
127.0.0.1) takes the issue's hand-written cases, then a bounded number of
hypothesis-generated bodies on every POST route over one keep-alive session, and must
still answer a valid request at the end.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlflow_tfx_plugin as tfx
from integration.test_server_openai import API_KEY, HELLO, Server, serve

pytestmark = pytest.mark.integration

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/invocations")
EXAMPLES_PER_ROUTE = 75  # 300 generated bodies in all: about a minute on 2 cores
VALID = {
    "/v1/chat/completions": {"model": "tiny", "messages": HELLO, "max_tokens": 3},
    "/v1/completions": {"model": "tiny", "prompt": "Once", "max_tokens": 3},
    "/v1/embeddings": {"model": "tiny", "input": ["a cat", "a dog"]},
    "/invocations": {"inputs": [{"messages": HELLO, "max_tokens": 3}]},
}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    base = tmp_path_factory.mktemp("fuzz")
    checkpoint = tiny_models.build_llama(base / "checkpoint")
    tfx.save_model(checkpoint, base / "model", task="llm/v1/chat")
    return base / "model"


@pytest.fixture(scope="module")
def server(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with serve(chat_model, log, max_batch_size=4, max_tokens_limit=8) as running:
        yield running


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as keep_alive:
        yield keep_alive


def _post(session: requests.Session, server: Server, route: str, body: bytes) -> None:
    """POST ``body``; fail on any 5xx, a 4xx that is not OpenAI's error JSON, or a stream
    that carries a server error."""
    response = session.post(
        f"{server.url}{route}", data=body, headers=HEADERS, timeout=60, stream=True
    )
    with response:
        text = response.content.decode()
    shown = body[:300]
    assert response.status_code < 500, f"{route} {shown!r} -> {response.status_code} {text}"
    if response.status_code >= 400:
        error = json.loads(text)["error"]
        assert error["type"] and error["message"], text
        assert "Traceback" not in error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert '"server_error"' not in text, f"{route} {shown!r} -> {text}"


def _still_serving(session: requests.Session, server: Server) -> None:
    answer = session.post(
        f"{server.url}/v1/chat/completions",
        json=VALID["/v1/chat/completions"],
        headers=HEADERS,
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


# -- the issue's hand-written cases ----------------------------------------------------------

MESSAGES = b'[{"role": "user", "content": "hi"}]'
CASES: list[tuple[str, bytes, str | None]] = [
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 1100 + b"]" * 1100 + b"}", "messages"),
    ("/invocations", b'{"inputs": ' + b"[" * 500 + b'"x"' + b"]" * 500 + b"}", "inputs"),
    ("/invocations", b'{"inputs": ' + b"[" * 150 + b'"x"' + b"]" * 150 + b"}", "inputs.0"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}',
        "messages.0.content",
    ),
    ("/v1/completions", b'{"prompt": "a\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/embeddings", b'{"input": ["ok", "\\udc00"]}', "input.1"),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": ' + MESSAGES + b"}", "model"),
    ("/invocations", b'{"prompt": "\\ud800"}', "prompt"),
]
BODIES: list[tuple[str, dict[str, Any], str | None]] = [
    ("/v1/completions", {"prompt": "a", "max_tokens": 2, "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2, "seed": -(2**70)}, "seed"),
    ("/v1/chat/completions", {"messages": HELLO, "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "", "stream": True}, "prompt"),
    ("/invocations", {"prompt": "", "max_tokens": 2}, "prompt"),
    (
        "/invocations",
        {"dataframe_split": {"columns": [["a"]], "data": [[1]]}},
        "dataframe_split.columns",
    ),
    (
        "/invocations",
        {"dataframe_split": {"columns": "ab", "data": [[1, 2]]}},
        "dataframe_split.columns",
    ),
    ("/invocations", {"dataframe_split": {"data": [1]}}, "dataframe_split"),
    ("/invocations", {"dataframe_split": [1]}, "dataframe_split"),
    ("/invocations", {"inputs": [1, 2]}, "inputs.0"),
    ("/invocations", {"inputs": ["hello"]}, "inputs.0"),
    ("/invocations", {"inputs": 5}, "inputs"),
    ("/invocations", {"inputs": []}, "inputs"),
    ("/invocations", {"instances": [[1]]}, "instances.0"),
    ("/invocations", {"instances": [None]}, "instances.0"),
    ("/invocations", {"dataframe_records": [{"messages": HELLO}, 3]}, "dataframe_records.1"),
]


def test_the_issues_cases_are_400s_naming_the_field(server: Server, session: requests.Session):
    cases = CASES + [(route, json.dumps(body).encode(), param) for route, body, param in BODIES]
    failures = []
    for route, body, param in cases:
        response = session.post(f"{server.url}{route}", data=body, headers=HEADERS, timeout=60)
        error = response.json().get("error") or {}
        if response.status_code != 400 or error.get("param") != param:
            failures.append((route, body[:80], response.status_code, error))
    assert not failures, "\n".join(map(str, failures))
    _still_serving(session, server)


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 1e-300}, {"temperature": 5e-324, "n": 2}, {"top_p": 1e-300, "n": 3}],
)
def test_a_temperature_or_top_p_too_small_to_represent_decodes_greedily(
    server: Server, session: requests.Session, sampling: dict[str, Any]
):
    greedy = {**VALID["/v1/completions"], "temperature": 0}
    expected = session.post(f"{server.url}/v1/completions", json=greedy, headers=HEADERS).json()
    body = {**VALID["/v1/completions"], **sampling}
    answer = session.post(f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=60)

    assert answer.status_code == 200, answer.text
    texts = {choice["text"] for choice in answer.json()["choices"]}
    assert texts == {expected["choices"][0]["text"]}
    _still_serving(session, server)


# -- generated bodies ------------------------------------------------------------------------

# fmt: off
_ODD_NUMBERS = [
    0, -1, 1, 2, 16, 17, 1e-300, 5e-324, 1e-6, 1e300, 2**31, 2**63, -(2**63), 2**70, -(2**70),
    math.nan, math.inf, -math.inf, 0.5, 1.0000001, -0.0,
]
_NUMERIC = [
    "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "n", "seed",
    "repetition_penalty", "presence_penalty", "frequency_penalty",
]
_OTHER = [
    "model", "stop", "stream", "stream_options", "ignore_eos", "echo", "suffix",
    "encoding_format", "dimensions", "user", "tools", "logprobs", "params",
]
# fmt: on
_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, codec=None)
_any_text = st.one_of(
    st.text(st.characters(codec=None, categories=["L", "N", "P", "S", "Z", "C"]), max_size=12),
    st.lists(st.one_of(_surrogate, st.characters()), max_size=6).map("".join),
    st.sampled_from(["", " ", "Hello there", "\x00", "\ufffd", "tiny", "default"]),
)
_number = st.one_of(
    st.sampled_from(_ODD_NUMBERS), st.integers(), st.floats(), st.floats(0, 2), st.integers(0, 20)
)
_scalars = st.one_of(st.none(), st.booleans(), _number, _any_text)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_any_text, inner, max_size=3),
    max_leaves=8,
)
_texts = st.one_of(_any_text, _any_text, st.lists(_any_text, max_size=3), _json_values)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system", "assistant", "tool", "robot"])},
    optional={"content": _texts, "name": _any_text},
)
_messages = st.one_of(st.lists(_message, max_size=3), _json_values)


def _field(name: str) -> st.SearchStrategy[Any]:
    if name in _NUMERIC:
        return st.one_of(_number, _number, _number, _json_values)
    if name in ("prompt", "input", "model", "user", "suffix"):
        return _texts
    if name == "messages":
        return _messages
    if name in ("stream", "ignore_eos", "echo"):
        return st.one_of(st.booleans(), st.booleans(), _json_values)
    if name == "params":
        return st.dictionaries(st.sampled_from(_NUMERIC), _number, max_size=3) | _json_values
    return _json_values


_request = st.fixed_dictionaries(
    {},
    optional={
        "messages": _messages,
        "prompt": _texts,
        "input": _texts,
        "max_tokens": _number,
        "temperature": _number,
    },
)
_pyfunc = {
    "inputs": st.one_of(st.lists(st.one_of(_request, _json_values), max_size=3), _json_values),
    "instances": st.lists(st.one_of(_request, _json_values), max_size=3),
    "dataframe_records": st.lists(st.one_of(_request, _json_values), max_size=3),
    "dataframe_split": st.one_of(
        st.fixed_dictionaries(
            {"data": st.lists(st.lists(_json_values, max_size=3), max_size=3)},
            optional={"columns": st.one_of(st.lists(_any_text, max_size=3), _json_values)},
        ),
        _json_values,
    ),
}


def _nested(depth: int, value: Any) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def _bodies(draw: st.DrawFn, route: str) -> bytes:
    """Mostly a valid body with a few fields replaced; sometimes deep, junk or truncated."""
    base = dict(VALID[route])
    if route == "/invocations":
        shape = draw(st.sampled_from(["openai", "pyfunc", "pyfunc"]))
        if shape == "openai":
            base = dict(VALID[draw(st.sampled_from(ROUTES[:3]))])
        else:
            key = draw(st.sampled_from(sorted(_pyfunc)))
            base = {key: draw(_pyfunc[key])}
    if draw(st.booleans()):  # the text itself: empty, odd, lone surrogates, not text
        if "messages" in base:
            base["messages"] = [{"role": "user", "content": draw(_texts)}]
        for name in ("prompt", "input"):
            if name in base:
                base[name] = draw(_texts)
    own = [name for name in base if name != "model"]
    names = st.sampled_from(own + _NUMERIC + _OTHER + ["messages", "prompt", "input"])
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        base[name] = draw(_field(name))
    if draw(st.integers(0, 15)) == 0:  # deep nesting somewhere in the body
        name = draw(st.sampled_from(sorted(base)))
        base[name] = _nested(draw(st.sampled_from([150, 199, 250])), base[name])
    text = json.dumps(base, allow_nan=True)  # lone surrogates go out as \udXXX escapes
    shape = draw(st.sampled_from(["body"] * 12 + ["truncated", "value"]))
    if shape == "truncated":
        return text[: draw(st.integers(0, len(text)))].encode()
    if shape == "value":
        return json.dumps(draw(_json_values)).encode()
    return text.encode()


@pytest.mark.parametrize("route", ROUTES)
def test_generated_bodies_never_get_a_5xx(server: Server, session: requests.Session, route: str):
    @settings(
        max_examples=EXAMPLES_PER_ROUTE,
        deadline=None,
        derandomize=True,  # the same bodies every run: a failure reproduces
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(body=_bodies(route))
    def check(body: bytes) -> None:
        _post(session, server, route, body)

    check()
    _still_serving(session, server)
