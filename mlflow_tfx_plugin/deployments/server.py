"""The deployment server's FastAPI app: OpenAI-compatible routes over one model.

:func:`create_app` builds it; :mod:`mlflow_tfx_plugin.deployments.listener` runs it (socket,
uvicorn, port hand-over).

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/invocations`` (the ``mlflow models serve`` payloads); ``GET /v1/models``, ``/health``
(200 once the model is loaded and warmed up, 503 before), ``/metrics`` (Prometheus) and
``/openapi.json``. Every failure is answered by :func:`api_error`'s mapping, as OpenAI's
error JSON, and leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from pydantic_core import from_json, to_json
from starlette import responses as starlette_responses
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mlflow_tfx_plugin.deployments.config import API_KEY_ENV, DeploymentConfig
from mlflow_tfx_plugin.deployments.metrics import MetricsMiddleware, ServerMetrics
from mlflow_tfx_plugin.deployments.service import (
    LoadOptions,
    ServedModel,
    load_served_model,
    require_model_name,
)
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError, TfxError
from mlflow_tfx_plugin.protocol import ErrorResponse
from mlflow_tfx_plugin.tasks.llm import LLMAdapter

_logger = logging.getLogger("mlflow_tfx_plugin.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
#: Seconds a request body may take to arrive once its headers have (then 408, and the
#: connection closes); the header deadline is the listener's.
BODY_TIMEOUT_S = float(os.environ.get("MLFLOW_TFX_BODY_TIMEOUT", "30"))
MAX_JSON_DEPTH = 200  # pydantic-core's parser limit; deeper bodies are a 400
_JSON_ERROR_AT = re.compile(r"at line (\d+) column (\d+)$")
_PASSTHROUGH_KEYS = {"messages": "chat", "prompt": "completions", "input": "embeddings"}
_PYFUNC_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class JSONResponse(starlette_responses.JSONResponse):
    """JSON rendered by pydantic-core: 32 embeddings (12,288 floats) take 1 ms, not 11."""

    def render(self, content: Any) -> bytes:
        return to_json(content)


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status (and headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str,
        param: str | None = None,
        code: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error = ErrorResponse.of(self.message, kind=self.kind, param=self.param, code=self.code)
        return error.model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(err: BaseException) -> APIError:
    """The one mapping from an exception to its HTTP status and OpenAI error."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, TfxError) and err.http_status < 500:
        param = err.param if isinstance(err, InvalidInputError) else None
        return APIError(
            err.http_status, err.message, kind=err.openai_type, param=param, code=err.openai_code
        )
    if isinstance(err, StarletteHTTPException):  # 404 and 405 (with its Allow header)
        return APIError(
            err.status_code, str(err.detail), kind="invalid_request_error", headers=err.headers
        )
    if isinstance(err, ClientDisconnect):  # nginx's 499: nobody reads it, /metrics counts it
        return APIError(499, "The client closed the connection.", kind="client_closed_request")
    return APIError(500, f"Internal error: {err}", kind="server_error")


class ErrorMiddleware:
    """Answers any exception that escapes the app with :func:`api_error`'s JSON.

    Starlette's own last-resort handler re-raises after answering, and uvicorn then closes
    the connection, so the client's next request on it would fail.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as err:
            if started:  # half a response: only closing the connection tells the client
                raise
            error = api_error(err)
            if error.status >= 500:
                _logger.exception("Unexpected error on %s", scope["path"])
            await error.response()(scope, receive, send)


@dataclass
class ServerState:
    """What the routes share: the model (once loaded), limits and metrics."""

    name: str
    config: DeploymentConfig
    api_key: str | None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    served: ServedModel | None = None
    load_error: str | None = None
    admitted: int = 0
    started: float = field(default_factory=time.time)
    stop_server: Callable[[], None] = lambda: None  # set by serve(): ends uvicorn's loop

    def model(self) -> ServedModel:
        if self.served is None:
            status = "failed to load" if self.load_error else "is still loading"
            raise APIError(503, f"The model {status}; retry shortly.", kind="service_unavailable")
        return self.served


def create_app(
    name: str,
    config: DeploymentConfig,
    *,
    model_dir: Path | None = None,
    served: ServedModel | None = None,
    api_key: str | None = None,
    listen_after_load: bool = False,
) -> FastAPI:
    """The server app over ``served``, or over ``model_dir`` loaded in the background
    (``/health`` answers 503 until it is ready) or, with ``listen_after_load``, before
    the app accepts any request."""
    state = ServerState(name=name, config=config, api_key=api_key)
    state.metrics.watch_queue(lambda: state.served.queue_depth if state.served else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if served is not None:
            state.served = served
        elif model_dir is not None and listen_after_load:
            # uvicorn listens once this returns: a server sharing its port with the one it
            # replaces (an update) must not take connections before it can answer them.
            await _load(state, model_dir)
            if state.served is None:
                raise RuntimeError(f"The model could not be loaded: {state.load_error}")
        elif model_dir is not None:
            loader = asyncio.create_task(_load(state, model_dir))  # /health says 503 meanwhile
        yield
        if loader is not None:
            loader.cancel()
        if state.served is not None:
            state.served.close()

    app = FastAPI(
        title=f"tfx deployment {name}",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by _add_routes, behind the API key
    )
    app.state.tfx = state
    app.add_middleware(ErrorMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: sees every status
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


async def _load(state: ServerState, model_dir: Path) -> None:
    options = LoadOptions(
        device=state.config.device,
        torch_dtype=state.config.torch_dtype,
        max_batch_size=state.config.max_batch_size,
        max_tokens_limit=state.config.max_tokens_limit,
        kv_cache_tokens=state.config.kv_cache_tokens,
        batch_decoding=state.config.batch_decoding,
    )
    try:
        started = time.perf_counter()
        served = await asyncio.to_thread(
            load_served_model,
            state.name,
            model_dir,
            options,
            state.metrics.batch_size.observe,
        )
        await served.warm_up()
    except Exception as err:
        _logger.exception("Loading the model from %s failed", model_dir)
        state.load_error = f"{type(err).__name__}: {err}"
        state.stop_server()
        return
    state.served = served
    _logger.info(
        "Model ready in %.1f s: task %s, routes %s",
        time.perf_counter() - started,
        served.task,
        ", ".join(served.routes) or "/invocations",
    )


def _add_routes(app: FastAPI, state: ServerState) -> None:
    auth = [Depends(_authorizer(state))]

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.served is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        if not state.served.healthy:
            down = "the generation loop is down (it restarts up to 3 times a minute); see the log"
            failed = {"status": "failed", "error": down}
            return JSONResponse(failed, status_code=503)
        ready = {"status": "ready", "model": state.name, "task": state.served.task}
        return JSONResponse({**ready, "pid": os.getpid()})

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        card = {
            "id": state.name,
            "object": "model",
            "created": int(state.started),
            "owned_by": "mlflow-tfx-plugin",
        }
        return {"object": "list", "data": [card]}

    handlers = {
        "/v1/chat/completions": _chat,
        "/v1/completions": _completions,
        "/v1/embeddings": _embeddings,
        "/invocations": _invocations,
    }
    for path, handle in handlers.items():
        app.add_api_route(path, _post_route(state, handle), methods=["POST"], dependencies=auth)


def _post_route(
    state: ServerState, handle: Callable[[ServerState, dict[str, Any]], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """A POST route: read the JSON body, then answer it in a request slot."""

    async def route(request: Request) -> Response:
        body = await read_body(request)
        return await _admitted(state, lambda: handle(state, body))

    return route


async def read_body(request: Request) -> dict[str, Any]:
    """The JSON object of a request: 413 when too large, 408 when it does not arrive within
    ``BODY_TIMEOUT_S``, 400 when not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    try:
        body = await asyncio.wait_for(_body_bytes(request), BODY_TIMEOUT_S)
    except TimeoutError:
        raise APIError(
            408,
            f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
            kind="invalid_request_error",
            code="request_timeout",
            headers={"Connection": "close"},  # the rest of the body may still be on its way
        ) from None
    return parse_json_object(body)


async def _body_bytes(request: Request) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; a 400 naming where it is malformed otherwise.

    pydantic-core's parser also rejects what would fail later as a 500: text that is not
    valid Unicode (lone surrogates such as ``"\\ud800"``) and nesting deeper than
    ``MAX_JSON_DEPTH`` (``json.loads`` raises RecursionError past ~1000).
    """
    if not body.strip():
        raise InvalidInputError("The request body is empty: send a JSON object.")
    try:
        data = from_json(body)
    except ValueError as err:
        raise _json_error(body, str(err)) from None
    if not isinstance(data, dict):
        raise InvalidInputError(
            f"The request body must be a JSON object, got {type(data).__name__}."
        )
    return data


def _json_error(body: bytes, reason: str) -> InvalidInputError:
    path = _json_error_path(body, reason)
    where = f" in '{path}'" if path else ""
    if reason.startswith("recursion limit exceeded"):
        top = path.split(".")[0] if path else None
        return InvalidInputError(
            f"The request body nests deeper than {MAX_JSON_DEPTH} levels"
            f"{f' in {top!r}' if top else ''}.",
            param=top,
        )
    if "surrogate" in reason or "unicode" in reason or "escape" in reason:
        return InvalidInputError(
            f"The request body has invalid text{where} ({reason}): strings must be valid "
            "Unicode, without lone surrogates such as \\ud800.",
            param=path,
        )
    return InvalidInputError(f"The request body is not valid JSON: {reason}.", param=path)


def _json_error_path(body: bytes, reason: str) -> str | None:
    """The dotted path (``messages.0.content``) of the value a parse error is in."""
    match = _JSON_ERROR_AT.search(reason)
    if match is None:
        return None
    line, column = int(match[1]), int(match[2])
    lines = body.split(b"\n", line - 1)[: line - 1]
    offset = sum(len(text) + 1 for text in lines) + column - 1  # columns count bytes
    try:
        node = from_json(body[: max(offset, 0)], allow_partial="trailing-strings")
    except ValueError:
        return None
    parts: list[str] = []
    while isinstance(node, dict | list) and node:
        key: Any = next(reversed(node)) if isinstance(node, dict) else len(node) - 1
        parts.append(str(key))
        node = node[key]
    return ".".join(parts) or None


def _model_for(state: ServerState, body: dict[str, Any]) -> ServedModel:
    """The served model, checking the ``model`` the body names (OpenAI clients always do)."""
    served = state.model()
    require_model_name(served, body.get("model"))
    return served


async def _admitted(state: ServerState, handle: Callable[[], Awaitable[Response]]) -> Response:
    """Run ``handle`` if a slot is free (else 429); a streamed response keeps its slot."""
    limit = state.config.max_concurrent_requests
    if state.admitted >= limit:
        raise APIError(
            429,
            f"Too many concurrent requests (max_concurrent_requests={limit}); retry later.",
            kind="rate_limit_error",
        )
    state.admitted += 1
    state.metrics.in_flight.inc()
    handed_over = False
    try:
        response = await handle()
        if isinstance(response, StreamingResponse):
            response.background = _release_task(state)
            handed_over = True
        return response
    finally:
        if not handed_over:
            _release(state)


def _release(state: ServerState) -> None:
    state.admitted -= 1
    state.metrics.in_flight.dec()


def _release_task(state: ServerState) -> BackgroundTask:
    return BackgroundTask(_release, state)


async def _chat(state: ServerState, body: dict[str, Any]) -> Response:
    served = _model_for(state, body)
    request = served.parse_chat(body)
    route = "/v1/chat/completions"
    return await _generate(state, route, request, served.chat_stream, served.chat_completion)


async def _completions(state: ServerState, body: dict[str, Any]) -> Response:
    served = _model_for(state, body)
    request = served.parse_completion(body)
    route = "/v1/completions"
    return await _generate(state, route, request, served.completion_stream, served.completion)


async def _generate(
    state: ServerState,
    route: str,
    request: Any,
    stream: Callable[[Any], AsyncGenerator[BaseModel, None]],
    complete: Callable[[Any], Awaitable[dict[str, Any]]],
) -> Response:
    """A streamed or a whole answer to a validated chat or completions request."""
    if request.stream:
        return await _stream(state, route, stream(request), request.include_usage)
    response = await _with_timeout(state, complete(request))
    _count_tokens(state, response)
    return JSONResponse(response)


async def _embeddings(state: ServerState, body: dict[str, Any]) -> Response:
    served = _model_for(state, body)
    request = served.parse_embedding(body)
    response = await _with_timeout(state, served.embedding(request))
    state.metrics.prompt_tokens.inc(response["usage"]["prompt_tokens"])
    return JSONResponse(response)


async def _invocations(state: ServerState, body: dict[str, Any]) -> Response:
    """``mlflow models serve`` payloads: OpenAI bodies pass through, the rest is pyfunc input."""
    passthrough = next((route for key, route in _PASSTHROUGH_KEYS.items() if key in body), None)
    served = _model_for(state, body)
    if passthrough == "chat" and served.chat is not None:
        return await _chat(state, body)
    if passthrough == "completions" and served.completions is not None:
        return await _completions(state, body)
    if passthrough == "embeddings" and served.embeddings is not None:
        return await _embeddings(state, body)
    data = _pyfunc_input(body)
    if isinstance(served.adapter, LLMAdapter):
        _check_requests(body, data)
    predictions = await _with_timeout(state, served.predict(data, body.get("params")))
    for prediction in predictions if isinstance(predictions, list) else [predictions]:
        if isinstance(prediction, dict):
            _count_tokens(state, prediction)
    if passthrough is not None:  # an OpenAI-style body answers unwrapped, as MLflow does
        return JSONResponse(_jsonable(predictions))
    return JSONResponse({"predictions": _jsonable(predictions)})


def _pyfunc_input(body: dict[str, Any]) -> Any:
    keys = [key for key in _PYFUNC_FORMATS if key in body]
    if not keys:
        if set(body) & set(_PASSTHROUGH_KEYS):
            return body
        raise InvalidInputError(
            "Unknown /invocations payload. Send an OpenAI body (with 'messages', 'prompt' or "
            f"'input') or one of: {', '.join(_PYFUNC_FORMATS)}.",
        )
    if len(keys) > 1:
        raise InvalidInputError(f"Send one of {', '.join(keys)}, not several.", param=keys[0])
    key = keys[0]
    if key == "dataframe_split":
        return _split_records(body[key])
    return body[key]


def _check_requests(body: dict[str, Any], data: Any) -> None:
    """An ``llm/v1`` model takes one OpenAI request object or a list of them."""
    key = next((key for key in _PYFUNC_FORMATS if key in body), None)
    if data == []:
        raise InvalidInputError(f"'{key}' holds no request.", param=key)
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            where = f"{key}.{index}" if isinstance(data, list) else key
            raise InvalidInputError(
                f"'{where}' must be an OpenAI request object (with 'messages', 'prompt' or "
                f"'input'), got {type(record).__name__}.",
                param=where,
            )


def _split_records(split: Any) -> list[dict[Any, Any]]:
    """The rows of a ``dataframe_split`` payload as the records pandas would make of them."""
    rows = split.get("data") if isinstance(split, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise InvalidInputError(
            "dataframe_split must be an object with 'data', a list of rows (lists), and "
            "optionally 'columns'.",
            param="dataframe_split",
        )
    width = max((len(row) for row in rows), default=0)
    columns = split.get("columns") or list(range(width))
    if (
        not isinstance(columns, list)
        or not all(isinstance(name, str | int) for name in columns)
        or len(set(columns)) != len(columns)
    ):
        raise InvalidInputError(
            "dataframe_split 'columns' must be a list of distinct column names.",
            param="dataframe_split.columns",
        )
    if any(len(row) != len(columns) for row in rows):
        raise InvalidInputError(
            f"dataframe_split has {len(columns)} columns, but a row of a different length.",
            param="dataframe_split",
        )
    return [dict(zip(columns, row, strict=True)) for row in rows]


async def _with_timeout(state: ServerState, work: Awaitable[Any]) -> Any:
    try:
        return await asyncio.wait_for(work, state.config.timeout)
    except TimeoutError:
        raise _timeout(state) from None


def _timeout(state: ServerState) -> APIError:
    return APIError(
        504,
        f"The request took longer than the deployment's timeout of {state.config.timeout:g} s.",
        kind="timeout_error",
    )


async def _stream(
    state: ServerState,
    route: str,
    chunks: AsyncGenerator[BaseModel, None],
    include_usage: bool,
) -> StreamingResponse:
    """Server-sent events; errors before the first chunk still get their HTTP status.

    The last chunk always carries usage (for the metrics); it is sent only when the
    client asked for it with ``stream_options.include_usage``.
    """
    started = time.perf_counter()
    try:
        first = await asyncio.wait_for(anext(chunks), state.config.timeout)
    except TimeoutError:
        await chunks.aclose()
        raise _timeout(state) from None
    state.metrics.time_to_first_token.labels(route).observe(time.perf_counter() - started)

    async def events() -> AsyncIterator[str]:
        try:
            yield _sse(first)
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), state.config.timeout)
                except StopAsyncIteration:
                    break
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    _count_tokens(state, {"usage": usage.model_dump()})
                    if not include_usage:
                        continue
                yield _sse(chunk)
        except (TimeoutError, EngineError) as err:
            error = _timeout(state) if isinstance(err, TimeoutError) else api_error(err)
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            await chunks.aclose()  # a client that went away cancels its generation here
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def _count_tokens(state: ServerState, response: dict[str, Any]) -> None:
    usage = response.get("usage")
    if usage:
        state.metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        state.metrics.completion_tokens.inc(usage.get("completion_tokens", 0))


def _authorizer(state: ServerState) -> Callable[[Request], Awaitable[None]]:
    async def authorize(request: Request) -> None:  # async: FastAPI runs sync ones in a thread
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise APIError(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>' (the key set "
                f"with -C api_key=... or ${API_KEY_ENV}).",
                kind="invalid_request_error",
                code="invalid_api_key",
            )

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    """Expected errors are answered where they are raised; the rest by ErrorMiddleware.

    No handler for ``Exception``: Starlette re-raises after running it (see ErrorMiddleware).
    """

    async def answer(request: Request, err: Exception) -> JSONResponse:
        return api_error(err).response()

    for expected in (APIError, InvalidInputError, StarletteHTTPException, ClientDisconnect):
        app.add_exception_handler(expected, answer)


def _too_large() -> APIError:
    return APIError(
        413,
        f"The request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB.",
        kind="invalid_request_error",
        code="request_too_large",
    )


def _jsonable(value: Any) -> Any:
    pd = sys.modules.get("pandas")  # only a loaded pandas can have made a DataFrame
    if pd is not None and isinstance(value, pd.DataFrame):
        return _jsonable(value.to_dict("records"))
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value
