"""The deployment server's FastAPI app: a thin router from HTTP to the model's serving object.

:func:`create_app` builds it; :mod:`mlflow_tfx_plugin.deployments.listener` runs it (socket,
uvicorn, port hand-over).

Each POST route (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/invocations``) reads the JSON body, takes a request slot, and hands the body to the
:class:`~mlflow_tfx_plugin.deployments.service.OpenAIServing` kept in ``app.state``; it
answers the response model as JSON or the chunk stream as server-sent events. ``GET
/v1/models``, ``/health`` (200 once the model is loaded and warmed up, 503 before),
``/metrics`` (Prometheus) and ``/openapi.json`` complete it. Every failure is answered
through :class:`APIError`, as OpenAI's error JSON, and leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from pydantic_core import to_json
from starlette import responses as starlette_responses
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mlflow_tfx_plugin.deployments.config import API_KEY_ENV, DeploymentConfig, key_digest
from mlflow_tfx_plugin.deployments.engine import EngineSettings
from mlflow_tfx_plugin.deployments.engine.threads import in_passing_thread
from mlflow_tfx_plugin.deployments.metrics import MetricsMiddleware, ServerMetrics
from mlflow_tfx_plugin.deployments.payloads import (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    EMBEDDINGS_ROUTE,
    HEALTH_ROUTE,
    INVOCATIONS_ROUTE,
    METRICS_ROUTE,
    MODELS_ROUTE,
    parse_json_object,
)
from mlflow_tfx_plugin.deployments.service import (
    Answer,
    ChunkStream,
    LoadOptions,
    OpenAIServing,
    ServedModel,
    load_served_model,
)
from mlflow_tfx_plugin.errors import EngineError, InvalidInputError, RequestTimeoutError, TfxError
from mlflow_tfx_plugin.protocol import ErrorResponse

_logger = logging.getLogger("mlflow_tfx_plugin.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
#: Seconds a request body may take to arrive once its headers have (then 408, and the
#: connection closes); the header deadline is the listener's.
BODY_TIMEOUT_S = float(os.environ.get("MLFLOW_TFX_BODY_TIMEOUT", "30"))


class JSONResponse(starlette_responses.JSONResponse):
    """JSON rendered by pydantic-core: 32 embeddings (12,288 floats) take 1 ms, not 11."""

    def render(self, content: Any) -> bytes:
        return to_json(content)


# -- errors: one mapping, one body ----------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status (and headers): the one
    builder of every error body the server sends, in a response or as an SSE event."""

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

    def event(self) -> str:
        """The error as the server-sent event that ends a stream which already began."""
        return f"data: {json.dumps(self.body())}\n\n"


def api_error(err: BaseException) -> APIError:
    """The one mapping from an exception to its HTTP status and OpenAI error."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, TfxError) and err.http_status != 500:  # a 500 is internal: see below
        return APIError(
            err.http_status,
            err.message,
            kind=err.openai_type,
            param=err.param if isinstance(err, InvalidInputError) else None,
            code=err.openai_code,
        )
    if isinstance(err, StarletteHTTPException):  # 404 and 405 (with its Allow header)
        return APIError(
            err.status_code, str(err.detail), kind="invalid_request_error", headers=err.headers
        )
    if isinstance(err, ClientDisconnect):  # nginx's 499: nobody reads it, /metrics counts it
        return APIError(499, "The client closed the connection.", kind="client_closed_request")
    return APIError(500, f"Internal error: {err}", kind="server_error")


def error_response(err: BaseException, path: str) -> JSONResponse:
    """The answer to a failed request; internal errors are logged with their traceback."""
    error = api_error(err)
    if error.status == 500:
        _logger.error("Unexpected error on %s", path, exc_info=err)
    return error.response()


class ErrorMiddleware:
    """Answers any exception that escapes the app with :func:`error_response`.

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
            await error_response(err, scope["path"])(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """Our errors, HTTP errors and disconnects are answered where they are raised; the rest
    by ErrorMiddleware. Both answer with :func:`error_response`.

    No handler for ``Exception``: Starlette re-raises after running it (see ErrorMiddleware).
    """

    async def answer(request: Request, err: Exception) -> JSONResponse:
        return error_response(err, request.url.path)

    for expected in (APIError, TfxError, StarletteHTTPException, ClientDisconnect):
        app.add_exception_handler(expected, answer)


# -- the app --------------------------------------------------------------------------------


@dataclass
class ServerState:
    """What the routes share: the serving object (once the model is loaded), limits, metrics."""

    name: str
    config: DeploymentConfig
    api_key_sha256: str | None  # only the digest is kept (a Ray replica is given no more)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    serving: OpenAIServing | None = None
    load_error: str | None = None
    admitted: int = 0
    started: float = field(default_factory=time.time)
    stop_server: Callable[[], None] = lambda: None  # set by serve(): ends uvicorn's loop

    def ready(self) -> OpenAIServing:
        if self.serving is None:
            status = "failed to load" if self.load_error else "is still loading"
            raise APIError(503, f"The model {status}; retry shortly.", kind="service_unavailable")
        return self.serving

    def serve(self, served: ServedModel) -> None:
        self.serving = OpenAIServing(served, timeout=self.config.timeout, metrics=self.metrics)


def create_app(
    name: str,
    config: DeploymentConfig,
    *,
    model_dir: Path | None = None,
    served: ServedModel | None = None,
    api_key: str | None = None,
    api_key_sha256: str | None = None,
    listen_after_load: bool = False,
) -> FastAPI:
    """The server app over ``served``, or over ``model_dir`` loaded in the background
    (``/health`` answers 503 until it is ready) or, with ``listen_after_load``, before
    the app accepts any request. Requests must carry ``api_key`` (or the key whose sha256
    hex digest is ``api_key_sha256``) if one is given."""
    digest = key_digest(api_key) if api_key is not None else api_key_sha256
    state = ServerState(name=name, config=config, api_key_sha256=digest)
    state.metrics.watch_queue(lambda: state.serving.model.queue_depth if state.serving else 0)
    state.metrics.watch_engine(lambda: state.serving.model.engine if state.serving else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if served is not None:
            state.serve(served)
        elif model_dir is not None and listen_after_load:
            # uvicorn listens once this returns: a server sharing its port with the one it
            # replaces (an update) must not take connections before it can answer them.
            await _load(app, model_dir)
            if state.serving is None:
                raise RuntimeError(f"The model could not be loaded: {state.load_error}")
        elif model_dir is not None:
            loader = asyncio.create_task(_load(app, model_dir))  # /health says 503 meanwhile
        yield
        if loader is not None:
            loader.cancel()
        if state.serving is not None:
            state.serving.model.close()

    app = FastAPI(
        title=f"tfx deployment {name}",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by a route, behind the API key
    )
    app.state.tfx = state
    app.add_middleware(ErrorMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: sees every status
    _add_error_handlers(app)
    app.include_router(public)
    app.include_router(router)
    return app


async def load_model(app: FastAPI, model_dir: Path) -> None:
    """Load, warm up and serve the model of ``model_dir`` in ``app``; raises if that fails."""
    state: ServerState = app.state.tfx
    started = time.perf_counter()
    served = await in_passing_thread(  # see engine/threads.py
        load_served_model,
        state.name,
        model_dir,
        LoadOptions.from_config(state.config),
        state.metrics.batch_size.observe,
    )
    await served.warm_up()
    state.serve(served)
    _logger.info(
        "Model ready in %.1f s: task %s, routes %s",
        time.perf_counter() - started,
        served.task,
        ", ".join(served.routes) or INVOCATIONS_ROUTE,
    )


async def _load(app: FastAPI, model_dir: Path) -> None:
    """:func:`load_model`, with a failure recorded for ``/health`` and the server stopped."""
    state: ServerState = app.state.tfx
    try:
        await load_model(app, model_dir)
    except Exception as err:
        _logger.exception("Loading the model from %s failed", model_dir)
        state.load_error = f"{type(err).__name__}: {err}"
        state.stop_server()


# -- routes ---------------------------------------------------------------------------------


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.tfx
    return state


async def authorize(request: Request) -> None:  # async: FastAPI runs sync ones in a thread
    expected = _state(request).api_key_sha256
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        key_digest(token.strip()), expected
    ):
        raise APIError(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>' (the key set "
            f"with -C api_key=... or ${API_KEY_ENV}).",
            kind="invalid_request_error",
            code="invalid_api_key",
        )


public = APIRouter()
router = APIRouter(dependencies=[Depends(authorize)])


@public.get(HEALTH_ROUTE)
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    if state.serving is None:
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    if not state.serving.model.healthy:
        limits = EngineSettings()  # the restart limits are not -C options
        down = (
            f"the generation loop is down (it restarts up to {limits.max_loop_restarts} times "
            f"in {limits.loop_restart_window_s:g} s); see the log"
        )
        return JSONResponse({"status": "failed", "error": down}, status_code=503)
    ready = {"status": "ready", "model": state.name, "task": state.serving.model.task}
    return JSONResponse({**ready, "pid": os.getpid()})


@router.get(METRICS_ROUTE)
async def metrics(request: Request) -> Response:
    server_metrics = _state(request).metrics
    return Response(server_metrics.render(), media_type=server_metrics.content_type)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get(MODELS_ROUTE)
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    card = {
        "id": state.name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "mlflow-tfx-plugin",
    }
    return {"object": "list", "data": [card]}


@router.post(CHAT_ROUTE)
async def create_chat_completion(request: Request) -> Response:
    state, body = _state(request), await read_body(request)
    with RequestSlot(state) as slot:
        return slot.answer(await state.ready().chat(body))


@router.post(COMPLETIONS_ROUTE)
async def create_completion(request: Request) -> Response:
    state, body = _state(request), await read_body(request)
    with RequestSlot(state) as slot:
        return slot.answer(await state.ready().completions(body))


@router.post(EMBEDDINGS_ROUTE)
async def create_embedding(request: Request) -> Response:
    state, body = _state(request), await read_body(request)
    with RequestSlot(state) as slot:
        return slot.answer(await state.ready().embeddings(body))


@router.post(INVOCATIONS_ROUTE)
async def invocations(request: Request) -> Response:
    state, body = _state(request), await read_body(request)
    with RequestSlot(state) as slot:
        return slot.answer(await state.ready().invocations(body))


# -- what the routes share ------------------------------------------------------------------


class RequestSlot:
    """One of ``max_concurrent_requests`` (else 429); a streamed answer keeps it to its end."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._kept = False

    def __enter__(self) -> RequestSlot:
        limit = self.state.config.max_concurrent_requests
        if self.state.admitted >= limit:
            raise APIError(
                429,
                f"Too many concurrent requests (max_concurrent_requests={limit}); retry later.",
                kind="rate_limit_error",
            )
        self.state.admitted += 1
        self.state.metrics.in_flight.inc()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._kept:
            self._release()

    def answer(self, result: Answer) -> Response:
        """JSON for a response model; server-sent events, holding this slot, for a stream."""
        if isinstance(result, BaseModel):
            return JSONResponse(result)
        self._kept = True
        release = BackgroundTask(self._release)
        return StreamingResponse(
            _events(result), media_type="text/event-stream", background=release
        )

    def _release(self) -> None:
        self.state.admitted -= 1
        self.state.metrics.in_flight.dec()


async def _events(chunks: ChunkStream) -> AsyncIterator[str]:
    """The chunks as server-sent events; a failure after the first is one error event."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
    except Exception as err:  # after the first byte, any failure is one error event
        error = api_error(err)
        if error.status >= 500 and not isinstance(err, RequestTimeoutError | EngineError):
            _logger.error("A stream failed unexpectedly.", exc_info=err)
        yield error.event()
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"


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


def _too_large() -> APIError:
    return APIError(
        413,
        f"The request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB.",
        kind="invalid_request_error",
        code="request_too_large",
    )
