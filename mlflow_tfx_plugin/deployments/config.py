"""The ``-C key=value`` configuration of a ``tfx`` deployment.

The MLflow CLI hands every value over as a string; :func:`parse_config` validates and
converts them, and rejects unknown keys with the list of valid ones.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from mlflow_tfx_plugin.errors import InvalidInputError

API_KEY_ENV = "MLFLOW_TFX_API_KEY"
"""Environment variable read for ``api_key`` when ``-C api_key=...`` is not given."""

_TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")

BatchDecoding = Literal["auto", "mixed", "greedy"]


class DeploymentConfig(BaseModel):
    """Validated settings of one deployment; field docs are shown by ``mlflow deployments help``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        "127.0.0.1", description="Interface to bind; a non-loopback one requires an api_key."
    )
    port: int | None = Field(
        None, ge=0, le=65535, description="TCP port; default: a free port chosen at create time."
    )
    api_key: SecretStr | None = Field(
        None,
        description=f"Require 'Authorization: Bearer KEY' on every route but /health "
        f"(default: ${API_KEY_ENV} if set).",
    )
    device: str | None = Field(None, description="torch device: cpu, cuda, cuda:1, mps, auto.")
    torch_dtype: str | None = Field(None, description="One of: " + ", ".join(_TORCH_DTYPES) + ".")
    max_batch_size: int = Field(
        16,
        ge=1,
        le=1024,
        description="Sequences decoded together, and requests per embedding batch.",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens the paged KV cache holds, shared by all sequences (default: "
        "128 per max_batch_size slot); never less than the context window.",
    )
    max_concurrent_requests: int = Field(
        64, ge=1, description="Requests admitted at once; more get HTTP 429."
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Upper bound on max_tokens per request (default: context window)."
    )
    timeout: float = Field(60.0, gt=0, description="Seconds before a request fails with HTTP 504.")
    batch_decoding: BatchDecoding = Field(
        "auto",
        description="mixed: greedy and sampled requests share each batch; greedy: a faster "
        "batch loop for greedy requests only, sampled ones run in separate small batches "
        "beside it; auto: greedy when the model's temperature (model_config) is 0, else mixed.",
    )

    @field_validator("torch_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.removeprefix("torch.") not in _TORCH_DTYPES:
            raise ValueError(f"must be one of {', '.join(_TORCH_DTYPES)}")
        return value.removeprefix("torch.") if value else value

    def to_public_dict(self) -> dict[str, Any]:
        """The settings without the API key, safe to store and print."""
        public = self.model_dump(exclude={"api_key"})
        public["api_key"] = "***" if self.api_key else None
        return public

    def server_arguments(self) -> dict[str, Any]:
        """What the server process needs besides the key (which travels by environment)."""
        return self.model_dump(exclude={"api_key"})

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None


def valid_keys() -> list[str]:
    return list(DeploymentConfig.model_fields)


def parse_config(
    config: Mapping[str, Any] | None, *, environ: Mapping[str, str] | None = None
) -> DeploymentConfig:
    """Validate ``-C`` options (strings or already typed values) into a :class:`DeploymentConfig`.

    Raises:
        InvalidInputError: an unknown key (the message lists the valid ones) or a bad value.
    """
    values = {key: _blank_to_none(value) for key, value in (config or {}).items()}
    unknown = sorted(set(values) - set(DeploymentConfig.model_fields))
    if unknown:
        raise InvalidInputError(
            f"Unknown config key(s) {', '.join(unknown)}. Valid keys: {', '.join(valid_keys())}. "
            "Pass them as -C key=value; see `mlflow deployments help -t tfx`.",
            param=unknown[0],
        )
    environ = os.environ if environ is None else environ
    if values.get("api_key") is None and environ.get(API_KEY_ENV):
        values["api_key"] = environ[API_KEY_ENV]
    try:
        parsed = DeploymentConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        raise InvalidInputError(
            f"Invalid config value for {key!r}: {first['msg']} "
            f"(got {values.get(key)!r}). See `mlflow deployments help -t tfx`.",
            param=key or None,
        ) from None
    _require_key_when_exposed(parsed)
    return parsed


def _require_key_when_exposed(config: DeploymentConfig) -> None:
    """A server reachable from other machines must not answer anyone who asks."""
    if config.api_key is None and not _is_loopback(config.host):
        raise InvalidInputError(
            f"host={config.host} exposes the model beyond this machine, so it needs an API "
            f"key: add -C api_key=... or set ${API_KEY_ENV}.",
            param="host",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    return value
