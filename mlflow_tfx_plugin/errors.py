"""One exception hierarchy for the plugin.

Every error is an :class:`mlflow.exceptions.MlflowException` carrying an MLflow
error code, so MLflow's scoring server and tracking server answer with the right
HTTP status. Errors about user input also subclass :class:`ValueError`.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_DOES_NOT_EXIST,
)


class TfxError(MlflowException):
    """Base class of every error raised by mlflow-tfx-plugin."""

    default_error_code = INVALID_STATE

    def __init__(self, message: str, *, error_code: int | None = None) -> None:
        super().__init__(message, error_code=error_code or self.default_error_code)


class InvalidInputError(TfxError, ValueError):
    """Bad user input: a wrong argument, an unknown parameter, malformed data.

    Attributes:
        param: the name of the offending argument or field, when there is one.
    """

    default_error_code = INVALID_PARAMETER_VALUE

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedTaskError(InvalidInputError):
    """The task is unknown to the flavor, or the model cannot perform it."""


class CheckpointError(InvalidInputError):
    """A checkpoint directory is missing files or is not a Transformers checkpoint."""


class UnsafeWeightsError(InvalidInputError):
    """Weights are stored in a pickle-based format and were not explicitly allowed."""


class ModelNotFoundError(TfxError):
    """A referenced model or file does not exist."""

    default_error_code = RESOURCE_DOES_NOT_EXIST
