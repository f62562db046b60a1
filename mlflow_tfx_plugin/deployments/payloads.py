"""Request bodies from ``predict`` inputs, and the server route each one goes to.

``mlflow deployments predict --input-path`` hands the client a pandas DataFrame read with
``pd.read_json``; :func:`requests_from_inputs` folds it back into the OpenAI request
bodies it came from. :func:`route_of` picks chat, completions, embeddings or /invocations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlflow_tfx_plugin.errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
EMBEDDINGS_ROUTE = "/v1/embeddings"
INVOCATIONS_ROUTE = "/invocations"
_OPENAI_KEYS = {"messages": CHAT_ROUTE, "prompt": COMPLETIONS_ROUTE, "input": EMBEDDINGS_ROUTE}
_INVOCATION_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


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
    if len(columns) == 1 and columns[0] in _INVOCATION_KEYS:
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
    if any(key in columns for key in _OPENAI_KEYS):
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


def route_of(body: Mapping[str, Any]) -> str:
    """The server route for a request body: chat, completions, embeddings or /invocations."""
    for key, route in _OPENAI_KEYS.items():
        if key in body:
            return route
    return INVOCATIONS_ROUTE
