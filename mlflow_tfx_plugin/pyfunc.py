"""The pyfunc face of a ``tfx`` model: what ``mlflow.pyfunc.load_model`` returns.

pandas and NumPy containers are converted to plain Python here, once, so task
adapters only ever see strings, lists, dicts, bytes and arrays of numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks import LLMAdapter, TaskAdapter


class TfxPyfuncModel:
    """Wraps a task adapter with MLflow's pyfunc ``predict(data, params)`` contract."""

    def __init__(self, adapter: TaskAdapter) -> None:
        self.adapter = adapter

    def get_raw_model(self) -> Any:
        """The object running the task (a transformers pipeline or the flavor's runner)."""
        return self.adapter.runner

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> Any:
        return self.adapter.predict(to_python(data), params)

    def predict_stream(self, data: Any, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """OpenAI stream chunks, for the ``llm/v1/chat`` and ``llm/v1/completions`` tasks."""
        if not isinstance(self.adapter, LLMAdapter) or not self.adapter.streamable:
            raise InvalidInputError(f"Task '{self.adapter.task}' does not support streaming.")
        return self.adapter.predict_stream(to_python(data), params)


def to_python(data: Any) -> Any:
    """Convert pyfunc input from pandas/NumPy containers to plain Python values."""
    # Data can only be a pandas object if pandas is loaded; the deployment server never
    # loads it (60 MB), so it is not imported here.
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(data, pd.DataFrame):
        return [
            {key: _plain(value) for key, value in row.items()} for row in data.to_dict("records")
        ]
    if pd is not None and isinstance(data, pd.Series):
        return [_plain(value) for value in data.tolist()]
    if isinstance(data, np.ndarray) and data.dtype == object:
        return [_plain(value) for value in data.tolist()]
    if isinstance(data, Mapping):
        return {key: _plain(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_plain(value) for value in data]
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
