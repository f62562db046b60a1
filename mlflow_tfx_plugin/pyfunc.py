"""The pyfunc face of a ``tfx`` model: what ``mlflow.pyfunc.load_model`` returns.

pandas and NumPy containers are converted to plain Python here, once, so task
adapters only ever see strings, lists, dicts, bytes and arrays of numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

from mlflow_tfx_plugin.errors import InvalidInputError
from mlflow_tfx_plugin.tasks import LLMAdapter, TaskAdapter
from mlflow_tfx_plugin.tasks.base import frame_records, plain


class TfxPyfuncModel:
    """Wraps a task adapter with MLflow's pyfunc ``predict(data, params)`` contract."""

    def __init__(self, adapter: TaskAdapter) -> None:
        self.adapter = adapter

    def get_raw_model(self) -> Any:
        """The object running the task (a transformers pipeline or the flavor's runner)."""
        return self.adapter.runner

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> Any:
        return self.adapter.predict(to_python(data, self.adapter), params)

    def predict_stream(self, data: Any, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """OpenAI stream chunks, for the ``llm/v1/chat`` and ``llm/v1/completions`` tasks."""
        if not isinstance(self.adapter, LLMAdapter) or not self.adapter.streamable:
            raise InvalidInputError(f"Task '{self.adapter.task}' does not support streaming.")
        return self.adapter.predict_stream(to_python(data), params)


def to_python(data: Any, adapter: TaskAdapter | type[TaskAdapter] | None = None) -> Any:
    """Convert pyfunc input from pandas/NumPy containers to plain Python values.

    A DataFrame becomes what the task's adapter makes of it (:meth:`TaskAdapter.from_frame`:
    one record per row unless the task says otherwise).
    """
    # Data can only be a pandas object if pandas is loaded; the deployment server never
    # loads it (60 MB), so it is not imported here.
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(data, pd.DataFrame):
        return adapter.from_frame(data) if adapter is not None else frame_records(data)
    if pd is not None and isinstance(data, pd.Series):
        return [plain(value) for value in data.tolist()]
    return plain(data)
