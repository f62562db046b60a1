"""HTTP to a deployment's server: one POST helper, error translation, SSE parsing.

The server answers errors as OpenAI error JSON; :func:`post_json` turns them into
:mod:`mlflow_tfx_plugin.errors` exceptions in one place (:func:`_http_error`), and
:func:`iter_sse_chunks` reads a streamed answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    PERMISSION_DENIED,
    REQUEST_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
    UNAUTHENTICATED,
)

from mlflow_tfx_plugin.deployments.config import API_KEY_ENV
from mlflow_tfx_plugin.errors import InvalidInputError, TfxError


class UnreachableError(Exception):
    """No connection to the server; the client checks whether an update moved it."""


_STATUS_ERRORS = {
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    429: REQUEST_LIMIT_EXCEEDED,
    503: TEMPORARILY_UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}


def post_json(
    url: str, body: Mapping[str, Any], *, api_key: str | None, timeout: float, stream: bool
) -> requests.Response:
    """POST ``body`` as JSON to ``url``, with the API key as a bearer token if given.

    Raises:
        UnreachableError: no connection (the caller decides whether to retry elsewhere).
        TfxError: no answer within ``timeout`` seconds (DEADLINE_EXCEEDED), or an HTTP
            error status other than those below.
        InvalidInputError: HTTP 400, 404, 413 or 422, with the server's ``param``.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = requests.post(
            url, json=dict(body), headers=headers, timeout=(10, timeout), stream=stream
        )
    except requests.ConnectionError as err:
        raise UnreachableError(str(err)) from err
    except requests.Timeout as err:
        raise TfxError(
            f"No answer from {url} within {timeout:.0f} s.", error_code=DEADLINE_EXCEEDED
        ) from err
    if response.status_code >= 400:
        raise _http_error(response, url)
    return response


def _http_error(response: requests.Response, url: str) -> MlflowException:
    """One place mapping the server's HTTP errors (OpenAI error JSON) to exceptions."""
    status = response.status_code
    try:
        error = response.json().get("error") or {}
        message, param = str(error.get("message") or response.text), error.get("param")
    except (ValueError, AttributeError):
        message, param = response.text[:500], None
    text = f"{url} answered HTTP {status}: {message}"
    if status == 401:
        text += f" Set ${API_KEY_ENV} to the deployment's API key."
    if status in (400, 404, 413, 422):
        return InvalidInputError(text, param=param)
    return TfxError(text, error_code=_STATUS_ERRORS.get(status, INTERNAL_ERROR))


def iter_sse_chunks(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ``text/event-stream`` body, up to ``data: [DONE]``.

    Raises:
        TfxError: the server sent an error frame mid-stream.
    """
    with response:
        for raw in response.iter_lines():
            line = raw.decode("utf-8", errors="replace")  # SSE is always UTF-8
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if isinstance(chunk, dict) and "error" in chunk:
                error = chunk["error"] or {}
                raise TfxError(f"The stream failed: {error.get('message', error)}")
            yield chunk
