"""The deployment server's HTTP edges, over real sockets to uvicorn on 127.0.0.1.

The app is the real one (``create_app``) under the real uvicorn settings
(``listener.uvicorn_config``), run in this process without a model: none of these edges
needs one (POST routes read and parse the body before they look for the model, which
answers 503 here). The header and body deadlines are shortened to 1 s for the test (the
defaults are 10 s and 30 s). Request validation is tested on the protocol models directly.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from mlflow_tfx_plugin.deployments import listener
from mlflow_tfx_plugin.deployments import server as server_module
from mlflow_tfx_plugin.deployments.config import DeploymentConfig
from mlflow_tfx_plugin.deployments.process import free_port
from mlflow_tfx_plugin.deployments.server import create_app
from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.protocol import (
    SAMPLING_EPS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_HEADERS = {**AUTH, "Content-Type": "application/json"}
DEADLINE_S = 1.0  # header and body deadlines, shortened for the test
#: How long a test waits for the server to close a stalled connection: the deadline plus
#: a margin for a loaded CI machine. It bounds the wait; the promise is "closed, not open".
CLOSE_WAIT_S = DEADLINE_S + 15
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Live:
    port: int
    app: FastAPI

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def raw(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=CLOSE_WAIT_S)
        return sock

    def requests_total(self) -> dict[tuple[str, str], float]:
        connection = self.connection()
        connection.request("GET", "/metrics", headers=AUTH)
        text = connection.getresponse().read().decode()
        connection.close()
        counts = {}
        for line in text.splitlines():
            if line.startswith("tfx_requests_total{"):
                labels, value = line[len("tfx_requests_total{") :].split("} ")
                parts = dict(part.split("=") for part in labels.split(","))
                counts[(parts["route"].strip('"'), parts["status"].strip('"'))] = float(value)
        return counts


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    patch = pytest.MonkeyPatch()
    patch.setattr(listener, "HEADER_TIMEOUT_S", DEADLINE_S)
    patch.setattr(server_module, "BODY_TIMEOUT_S", DEADLINE_S)
    port = free_port()
    config = DeploymentConfig(port=port)
    app = create_app("tiny", config, api_key=KEY)

    # Test-only route: after the validation fixes no request makes a real route fail
    # unexpectedly, so this one raises as a bug would.
    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    uv = uvicorn.Server(listener.uvicorn_config(app, config))
    sock = listener.listening_socket("127.0.0.1", port)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Live(port, app)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()
        patch.undo()


def _json(response: http.client.HTTPResponse) -> dict[str, Any]:
    assert response.getheader("content-type", "").startswith("application/json")
    return json.loads(response.read())


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; socket.timeout if it never does."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- item 6: an unexpected error answers a JSON 500 and the connection stays usable ------


def test_an_unexpected_error_is_a_json_500_on_a_connection_that_stays_usable(live: Live):
    connection = live.connection()
    connection.request("GET", "/test-only/boom", headers=AUTH)
    response = connection.getresponse()
    error = _json(response)["error"]
    sock = connection.sock

    assert response.status == 500
    assert error["type"] == "server_error" and "a bug" in error["message"]
    for _ in range(3):  # the same keep-alive connection, not a new one
        connection.request("GET", "/v1/models", headers=AUTH)
        models = connection.getresponse()
        assert models.status == 200, models.read()
        assert json.loads(models.read())["data"][0]["id"] == "tiny"
        assert connection.sock is sock
    connection.close()


def test_client_errors_keep_the_connection_too(live: Live):
    connection = live.connection()
    bodies = {
        b"{not json": None,
        b'{"messages": "\\ud800"}': "messages",
        b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}": "messages",
    }
    for body, param in bodies.items():
        connection.request("POST", "/v1/chat/completions", body=body, headers=JSON_HEADERS)
        response = connection.getresponse()
        assert response.status == 400 and _json(response)["error"]["param"] == param
        sock = connection.sock
    connection.request("GET", "/v1/models", headers=AUTH)
    assert connection.getresponse().status == 200
    assert connection.sock is sock


# -- item 5: malformed JSON is a 400 that names the field ----------------------------------


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 1100 + b"]" * 1100 + b"}", "messages"),
        ("/invocations", b'{"inputs": ' + b"[" * 500 + b'"x"' + b"]" * 500 + b"}", "inputs"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
            "messages.0.content",
        ),
        ("/v1/chat/completions", b'{"model": "\\udfff", "messages": []}', "model"),
        ("/v1/completions", b'{"prompt": ["ok", "\\ud800\\u0041"]}', "prompt.1"),
        ("/v1/embeddings", b'{\n"model": "tiny",\n"input": "caf\xc3\xa9 \\udc00"}', "input"),
        ("/invocations", b'{"inputs": {"messages": [{"content": "\\ud83d"}]}}', None),
    ],
    ids=["deep-1100", "deep-500-inputs", "content", "model", "prompt", "input", "inputs"],
)
def test_malformed_json_is_a_400_naming_the_field(
    live: Live, route: str, body: bytes, param: str | None
):
    connection = live.connection()
    connection.request("POST", route, body=body, headers=JSON_HEADERS)
    response = connection.getresponse()
    error = _json(response)["error"]
    connection.close()

    assert response.status == 400, error
    assert error["type"] == "invalid_request_error"
    assert error["param"] == (param or "inputs.messages.0.content"), error
    assert "Traceback" not in error["message"]


def test_a_valid_surrogate_pair_and_an_empty_body(live: Live):
    connection = live.connection()
    emoji = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    connection.request("POST", "/v1/chat/completions", body=emoji, headers=JSON_HEADERS)
    parsed = connection.getresponse()
    assert parsed.status == 503, parsed.read()  # parsed: only the model is missing here
    parsed.read()
    connection.request("POST", "/v1/chat/completions", body=b"", headers=JSON_HEADERS)
    empty = connection.getresponse()
    assert empty.status == 400 and "empty" in _json(empty)["error"]["message"]


# -- item 10: the OpenAPI schema needs the key ---------------------------------------------


def test_openapi_needs_the_key_and_docs_are_off(live: Live):
    connection = live.connection()
    connection.request("GET", "/openapi.json")
    anonymous = connection.getresponse()
    assert anonymous.status == 401 and _json(anonymous)["error"]["code"] == "invalid_api_key"
    connection.request("GET", "/openapi.json", headers=AUTH)
    schema = connection.getresponse()
    assert schema.status == 200 and "/v1/chat/completions" in _json(schema)["paths"]
    for path in ("/docs", "/redoc"):
        connection.request("GET", path)
        off = connection.getresponse()
        off.read()
        assert off.status == 404


# -- item 12: 405 keeps Allow; a malformed request line is a JSON 400 ------------------------


def test_405_keeps_its_allow_header(live: Live):
    connection = live.connection()
    connection.request("GET", "/v1/completions", headers=AUTH)
    response = connection.getresponse()

    assert response.status == 405
    assert response.getheader("allow") == "POST"
    assert _json(response)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT AN HTTP REQUEST\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * listener.MAX_HEADER_BYTES,
    ],
    ids=["request-line", "headers-over-16KiB"],
)
def test_a_protocol_error_is_a_json_400(live: Live, request_bytes: bytes):
    with live.raw() as sock:
        sock.sendall(request_bytes)
        answer = _read_until_closed(sock)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


# -- item 11: stalled headers and bodies are closed within the deadlines --------------------


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"],
    ids=["nothing", "half-headers"],
)
def test_a_connection_without_complete_headers_is_closed(live: Live, sent: bytes):
    with live.raw() as sock:
        sock.sendall(sent)
        assert _read_until_closed(sock) == b""  # closed, not answered (and no timeout)


def test_half_headers_after_a_kept_alive_request_are_closed(live: Live):
    with live.raw() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the whole JSON answer (no model: a 503)
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert _read_until_closed(sock) == b""


def test_a_body_that_stops_arriving_is_a_408_and_the_connection_closes(live: Live):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    with live.raw() as sock:
        sock.sendall(head + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        sock.sendall(b'{"prompt": ')
        answer = _read_until_closed(sock)

    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


# -- item 13: a client that leaves mid-body is a 499, not a 500 ------------------------------


def test_a_client_that_disconnects_mid_body_is_counted_as_499(live: Live):
    before = live.requests_total()
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    with live.raw() as sock:
        sock.sendall(head + b"\r\nContent-Length: 1000\r\n\r\n" + b'{"input": "ab')
    deadline = time.monotonic() + 20
    counted: dict[str, float] = {}
    while not counted and time.monotonic() < deadline:
        after = live.requests_total()
        counted = {
            status: value - before.get((route, status), 0)
            for (route, status), value in after.items()
            if route == "/v1/embeddings" and value > before.get((route, status), 0)
        }
        time.sleep(0.05)

    assert counted == {"499": 1.0}


# -- items 1 and 5: request values the kernels cannot take ----------------------------------


@pytest.mark.parametrize(
    ("fields", "temperature", "top_p"),
    [
        ({"temperature": 1e-300}, 0.0, 1.0),
        ({"temperature": 5e-324, "top_p": 0.5}, 0.0, 1.0),
        ({"temperature": SAMPLING_EPS / 2}, 0.0, 1.0),
        ({"temperature": 0.7, "top_p": 1e-300}, 0.0, 1.0),
        ({"temperature": SAMPLING_EPS, "top_p": 0.9}, SAMPLING_EPS, 0.9),
        ({"temperature": 0}, 0.0, 1.0),
    ],
)
def test_a_temperature_or_top_p_too_small_to_sample_with_is_greedy(
    fields: dict[str, float], temperature: float, top_p: float
):
    request = parse_request(ChatCompletionRequest, {"messages": HELLO, **fields})
    params = request.generation_params()

    assert (params.temperature, params.top_p) == (temperature, top_p)
    assert params.greedy == (temperature == 0)


def test_a_tiny_default_temperature_from_model_config_is_greedy_too():
    request = parse_request(ChatCompletionRequest, {"messages": HELLO})
    assert request.generation_params({"temperature": 1e-300}).greedy


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (CompletionRequest, {"prompt": "a", "seed": 2**70}, "seed"),
        (CompletionRequest, {"prompt": "a", "seed": -(2**70)}, "seed"),
        (CompletionRequest, {"prompt": "a", "seed": 2**63}, "seed"),
        (CompletionRequest, {"prompt": "a", "repetition_penalty": 1e-300}, "repetition_penalty"),
        (CompletionRequest, {"prompt": "a", "repetition_penalty": 1e300}, "repetition_penalty"),
        (CompletionRequest, {"prompt": ""}, "prompt"),
        (CompletionRequest, {"prompt": []}, "prompt"),
        (CompletionRequest, {"prompt": ["a", ""]}, "prompt"),
    ],
)
def test_values_the_kernels_cannot_take_are_rejected(
    model: type[Any], fields: dict[str, Any], param: str
):
    with pytest.raises(InvalidInputError) as caught:
        parse_request(model, fields)
    assert caught.value.param == param


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": 2**63 - 1},
        {"seed": -(2**63)},
        {"seed": -1},
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 1.2},
        {"repetition_penalty": 100},
    ],
)
def test_values_at_the_bounds_are_accepted(fields: dict[str, Any]):
    parse_request(CompletionRequest, {"prompt": "a", **fields})


# -- issue 14: no OpenAI field that changes the answer is silently dropped ------------------

_CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        (ChatCompletionRequest, {**_CHAT, "logit_bias": {"50256": -100}}, "logit_bias"),
        (ChatCompletionRequest, {**_CHAT, "functions": [{"name": "f"}]}, "functions"),
        (ChatCompletionRequest, {**_CHAT, "function_call": "auto"}, "function_call"),
        (ChatCompletionRequest, {**_CHAT, "prediction": {"type": "content"}}, "prediction"),
        (ChatCompletionRequest, {**_CHAT, "modalities": ["text", "audio"]}, "modalities"),
        (ChatCompletionRequest, {**_CHAT, "reasoning_effort": "low"}, "reasoning_effort"),
        (CompletionRequest, {"prompt": "a", "best_of": 3}, "best_of"),
        (CompletionRequest, {"prompt": "a", "logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_fields_that_would_change_the_answer_are_rejected_by_name(
    model: type[Any], fields: dict[str, Any], param: str
):
    with pytest.raises(InvalidInputError, match="would change the answer") as caught:
        parse_request(model, fields)
    assert caught.value.param == param


@pytest.mark.parametrize(
    "fields", [{"metadata": {"team": "a"}}, {"store": False}, {"service_tier": "auto"}]
)
def test_fields_that_cannot_change_the_answer_are_ignored(fields: dict[str, Any]):
    assert parse_request(ChatCompletionRequest, {**_CHAT, **fields}).model_extra == fields


# -- a failure after a stream's first byte ------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status"),
    [(RuntimeError("a bug"), 500), (InvalidInputError("bad", param="stop"), 400)],
)
def test_any_failure_mid_stream_is_one_error_event_then_done(failure: Exception, status: int):
    from pydantic import BaseModel

    from mlflow_tfx_plugin.deployments.server import _events

    class Chunk(BaseModel):
        text: str

    async def chunks() -> Any:
        yield Chunk(text="first")
        raise failure

    async def collect() -> list[str]:
        return [event async for event in _events(chunks())]

    events = asyncio.run(collect())
    assert events[0] == 'data: {"text":"first"}\n\n' and events[-1] == "data: [DONE]\n\n"
    [error] = [json.loads(event[len("data: ") :])["error"] for event in events[1:-1]]
    assert (error["type"] == "server_error") == (status == 500)
