"""One exception hierarchy for the plugin.

Every error is an :class:`mlflow.exceptions.MlflowException` carrying an MLflow
error code, so MLflow's scoring server and tracking server answer with the right
HTTP status, and a :class:`click.ClickException`, so the ``mlflow`` CLI prints its message
alone, without a traceback. Errors about user input also subclass :class:`ValueError`.

One process is different: the deployment server, which the ``tfx`` target starts with
``MLFLOW_TFX_SERVER_PROCESS=1``. It never imports MLflow (that import costs it about
1.8 s and 100 MB of memory), so there the same classes derive from
:class:`StandaloneError`, which has the same ``message`` and ``error_code`` attributes.
Nothing in that process catches ``MlflowException``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

#: Set to ``1`` in the environment of the deployment server process (see the module doc).
SERVER_PROCESS_ENV = "MLFLOW_TFX_SERVER_PROCESS"


class StandaloneError(Exception):
    """The root of the hierarchy in the deployment server process, which runs without MLflow.

    Attributes:
        message: the error message.
        error_code: the name of the MLflow error code (``"INVALID_PARAMETER_VALUE"``, ...).
    """

    def __init__(self, message: str, error_code: int | str = "INTERNAL_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.error_code = str(error_code)


def runs_without_mlflow() -> bool:
    """Whether this process is the deployment server, which never imports MLflow."""
    return os.environ.get(SERVER_PROCESS_ENV) == "1"


def _root_exception() -> type[Exception]:
    if runs_without_mlflow():
        return StandaloneError
    import click
    from mlflow.exceptions import MlflowException

    class CliError(MlflowException, click.ClickException):
        """An MlflowException that the MLflow CLI (click) prints as one line: ``Error: ...``.

        The traceback is logged at DEBUG level under MLflow's logger, so
        ``MLFLOW_LOGGING_LEVEL=DEBUG`` shows it.
        """

        def show(self, file: Any = None) -> None:
            logging.getLogger("mlflow.tfx_plugin").debug("Traceback:", exc_info=self)
            super().show(file)

    return CliError


_Root: Any = _root_exception()


class TfxError(_Root):
    """Base class of every error raised by mlflow-tfx-plugin.

    Args:
        message: what went wrong and what to do about it.
        error_code: an MLflow error code, as its name (``"RESOURCE_ALREADY_EXISTS"``) or
            its ``databricks_pb2`` number; the class's ``default_error_code`` otherwise.
    """

    default_error_code: int | str = "INVALID_STATE"
    #: How the deployment server answers it: HTTP status, OpenAI error ``type`` and ``code``.
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    openai_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, error_code: int | str | None = None) -> None:
        code = error_code or self.default_error_code
        if _Root is StandaloneError:
            super().__init__(message, code)
        else:
            super().__init__(message, error_code=_error_code_number(code))


def _error_code_number(code: int | str) -> int:
    if isinstance(code, int):
        return code
    from mlflow.protos.databricks_pb2 import ErrorCode

    return int(ErrorCode.Value(code))


class InvalidInputError(TfxError, ValueError):
    """Bad user input: a wrong argument, an unknown parameter, malformed data.

    Attributes:
        param: the name of the offending argument or field, when there is one.
    """

    default_error_code = "INVALID_PARAMETER_VALUE"
    http_status = 400
    openai_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedTaskError(InvalidInputError):
    """The task is unknown to the flavor, or the model cannot perform it."""

    http_status = 404


class UnknownModelError(InvalidInputError):
    """A request names a model the deployment server does not serve (OpenAI's 404)."""

    http_status = 404
    openai_code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class EngineError(TfxError):
    """The model failed while generating; the request fails, the server stays up."""


class RequestTimeoutError(TfxError):
    """A request took longer than the deployment's ``timeout`` (the server's 504)."""

    default_error_code = "DEADLINE_EXCEEDED"
    http_status = 504
    openai_type = "timeout_error"


class CheckpointError(InvalidInputError):
    """A checkpoint directory is missing files or is not a Transformers checkpoint."""


class UnsafeWeightsError(InvalidInputError):
    """Weights are stored in a pickle-based format and were not explicitly allowed."""


class ModelNotFoundError(TfxError):
    """A referenced model or file does not exist."""

    default_error_code = "RESOURCE_DOES_NOT_EXIST"


class CorruptRecordError(TfxError):
    """A deployment record on disk cannot be read.

    Attributes:
        name: the deployment.
        path: the record file.
        pid, pid_create_time: its server's process, when they could still be read.
    """

    default_error_code = "INVALID_STATE"

    def __init__(
        self,
        message: str,
        *,
        name: str,
        path: str,
        pid: int | None = None,
        pid_create_time: float | None = None,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.path = path
        self.pid = pid
        self.pid_create_time = pid_create_time


class HubError(TfxError):
    """The Hub (or the local HF cache) could not provide what a reference names.

    A 400, not a 5xx: MLflow's REST client retries 5xx answers with long back-offs, and
    a registration whose source cannot be fetched should fail at once with the reason.
    """

    default_error_code = "INVALID_PARAMETER_VALUE"

    def __init__(self, detail: str, *, fix: str = "") -> None:
        super().__init__(f"{detail} {fix}".strip())
        #: What failed, without the advice on how to fix it.
        self.detail = detail


class IntegrityError(HubError):
    """A downloaded file does not match its recorded sha256."""
