"""Request bodies: the server's routes, the ``/invocations`` formats, and the JSON itself.

This module owns the vocabulary of the deployment's wire formats, for the server and the
client alike: the route names, the keys that make a body an OpenAI request
(:data:`OPENAI_KEYS`) and the ``mlflow models serve`` formats (:data:`PYFUNC_FORMATS`).

* Server side: :func:`parse_json_object` reads every request body (a 400 naming the field
  when it is malformed); :func:`pyfunc_input`, :func:`check_requests` and
  :class:`InvocationsResponse` are the ``/invocations`` formats, in and out.
* Client side: ``mlflow deployments predict --input-path`` hands the client a pandas
  DataFrame read with ``pd.read_json``; :func:`requests_from_inputs` folds it back into the
  OpenAI request bodies it came from, and :func:`route_of` picks the route for each.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import RootModel
from pydantic_core import from_json

from mlflow_tfx_plugin.errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
EMBEDDINGS_ROUTE = "/v1/embeddings"
MODELS_ROUTE = "/v1/models"
INVOCATIONS_ROUTE = "/invocations"
HEALTH_ROUTE = "/health"
METRICS_ROUTE = "/metrics"
#: Every route the server answers (others are 404s, counted as "other" on /metrics).
ROUTES = (
    CHAT_ROUTE,
    COMPLETIONS_ROUTE,
    EMBEDDINGS_ROUTE,
    MODELS_ROUTE,
    INVOCATIONS_ROUTE,
    HEALTH_ROUTE,
    METRICS_ROUTE,
)
#: The key that makes a body an OpenAI request, and its route; the first one present wins.
OPENAI_KEYS = {"messages": CHAT_ROUTE, "prompt": COMPLETIONS_ROUTE, "input": EMBEDDINGS_ROUTE}
#: The ``mlflow models serve`` payloads: a body holds one of these keys.
PYFUNC_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")

MAX_JSON_DEPTH = 200  # pydantic-core's parser limit; deeper bodies are a 400
_JSON_ERROR_AT = re.compile(r"at line (\d+) column (\d+)$")


def openai_route(body: Mapping[str, Any]) -> str | None:
    """The OpenAI route a body is for (by its keys), or None for an ``/invocations`` one."""
    return next((route for key, route in OPENAI_KEYS.items() if key in body), None)


def route_of(body: Mapping[str, Any]) -> str:
    """The server route for a request body: chat, completions, embeddings or /invocations."""
    return openai_route(body) or INVOCATIONS_ROUTE


# -- every request body ---------------------------------------------------------------------


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


# -- /invocations ---------------------------------------------------------------------------


class InvocationsResponse(RootModel[Any]):
    """An ``/invocations`` answer: ``{"predictions": ...}``, or the predictions alone."""

    @classmethod
    def of(cls, predictions: Any, *, unwrapped: bool) -> InvocationsResponse:
        """``unwrapped`` answers an OpenAI-style body the way MLflow does: without the key."""
        value = _jsonable(predictions)
        return cls.model_construct(value if unwrapped else {"predictions": value})


def pyfunc_input(body: dict[str, Any]) -> Any:
    """The model input an ``/invocations`` body carries (the body itself for OpenAI keys)."""
    keys = [key for key in PYFUNC_FORMATS if key in body]
    if not keys:
        if set(body) & set(OPENAI_KEYS):
            return body
        raise InvalidInputError(
            f"Unknown {INVOCATIONS_ROUTE} payload. Send an OpenAI body (with "
            f"{_either(OPENAI_KEYS)}) or one of: {', '.join(PYFUNC_FORMATS)}.",
        )
    if len(keys) > 1:
        raise InvalidInputError(f"Send one of {', '.join(keys)}, not several.", param=keys[0])
    key = keys[0]
    if key == "dataframe_split":
        return _split_records(body[key])
    return body[key]


def check_requests(body: dict[str, Any], data: Any) -> None:
    """An ``llm/v1`` model takes one OpenAI request object or a list of them."""
    key = next((key for key in PYFUNC_FORMATS if key in body), None)
    if data == []:
        raise InvalidInputError(f"'{key}' holds no request.", param=key)
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            where = f"{key}.{index}" if isinstance(data, list) else key
            raise InvalidInputError(
                f"'{where}' must be an OpenAI request object (with {_either(OPENAI_KEYS)}), "
                f"got {type(record).__name__}.",
                param=where,
            )


def _either(keys: Iterable[str]) -> str:
    """``'messages', 'prompt' or 'input'``: the keys, quoted, for an error message."""
    *others, last = (f"'{key}'" for key in keys)
    return f"{', '.join(others)} or {last}"


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


def _jsonable(value: Any) -> Any:
    # Only a loaded pandas (NumPy) can have made a DataFrame (an array): no import here.
    pd, np = sys.modules.get("pandas"), sys.modules.get("numpy")
    if pd is not None and isinstance(value, pd.DataFrame):
        return _jsonable(value.to_dict("records"))
    if np is not None and isinstance(value, np.ndarray):
        return value.tolist()
    if np is not None and isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


# -- predict inputs, client side ------------------------------------------------------------


def requests_from_inputs(inputs: Any) -> list[dict[str, Any]]:
    """Request bodies for ``predict``: one per dict, or from a DataFrame (see below).

    A DataFrame is what ``mlflow deployments predict --input-path`` reads with
    ``pd.read_json``:

    * a chat body ``{"messages": [...], "max_tokens": 5}`` arrives with one message per row
      and the other keys repeated: it becomes that one chat request again;
    * rows that differ only in ``prompt`` (or ``input``) become one request with a list;
    * other rows holding ``messages``/``prompt``/``input`` are one request each;
    * a single ``inputs``/``instances``/``dataframe_records``/``dataframe_split`` column is
      sent as that /invocations payload; any other DataFrame as ``dataframe_split``.

    Raises:
        InvalidInputError: empty input, an unsupported type, or chat rows that disagree.
    """
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    if isinstance(inputs, list) and inputs and all(isinstance(i, Mapping) for i in inputs):
        return [dict(item) for item in inputs]
    if type(inputs).__name__ == "DataFrame" and hasattr(inputs, "to_json"):
        return _requests_from_dataframe(inputs)
    raise InvalidInputError(
        "predict takes a request body (dict), a list of them, or a pandas DataFrame; "
        f"got {type(inputs).__name__}.",
        param="inputs",
    )


def _requests_from_dataframe(df: pd.DataFrame) -> list[dict[str, Any]]:
    if df.empty:
        raise InvalidInputError("The input DataFrame is empty.", param="inputs")
    columns = [str(column) for column in df.columns]
    if len(columns) == 1 and columns[0] in PYFUNC_FORMATS:
        return [{columns[0]: _column_payload(df)}]
    rows = [
        {key: value for key, value in row.items() if value is not None}
        for row in json.loads(df.to_json(orient="records"))
    ]
    if "messages" in columns and all(isinstance(r.get("messages"), dict) for r in rows):
        return [_merge_rows(rows, "messages")]
    for key in ("prompt", "input"):
        if key in columns and len(rows) > 1 and _differ_only_in(rows, key):
            return [_merge_rows(rows, key)]
    if any(key in columns for key in OPENAI_KEYS):
        return rows
    return [{"dataframe_split": json.loads(df.to_json(orient="split", index=False))}]


def _column_payload(df: pd.DataFrame) -> Any:
    import pandas as pd

    series = df.iloc[:, 0]
    if isinstance(df.index, pd.RangeIndex):
        return json.loads(series.to_json(orient="values"))
    return json.loads(series.to_json(orient="index"))


def _differ_only_in(rows: list[dict[str, Any]], key: str) -> bool:
    if not all(isinstance(row.get(key), str) for row in rows):
        return False
    others = [{k: v for k, v in row.items() if k != key} for row in rows]
    return all(other == others[0] for other in others)


def _merge_rows(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Fold rows that pandas exploded out of one body back into that body."""
    body: dict[str, Any] = {key: [row.get(key) for row in rows]}
    for row in rows:
        for other, value in row.items():
            if other == key:
                continue
            if other in body and body[other] != value:
                raise InvalidInputError(
                    f"The rows of the input disagree on {other!r} ({body[other]!r} vs "
                    f"{value!r}). Write the input file as a JSON list of request bodies, or "
                    "call predict() with a dict.",
                    param=other,
                )
            body[other] = value
    return body
