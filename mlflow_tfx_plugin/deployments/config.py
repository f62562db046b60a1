"""The ``-C key=value`` configuration of a ``tfx`` deployment.

The MLflow CLI hands every value over as a string; :func:`parse_config` validates and
converts them, and rejects unknown keys with the list of valid ones.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from mlflow_tfx_plugin.errors import InvalidInputError

API_KEY_ENV = "MLFLOW_TFX_API_KEY"
"""Environment variable read for ``api_key`` when ``-C api_key=...`` is not given."""

DEFAULT_BATCH_SIZE = 16
"""Requests per micro-batch when ``max_batch_size`` is not set, and the fewest sequences a
continuous batch sized from its KV cache runs."""

_TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")

BatchDecoding = Literal["auto", "mixed", "greedy"]
Backend = Literal["process", "ray"]

RAY_ONLY = "(backend=ray only) "
"""How the description of a key that only the Ray backend reads begins."""


class DeploymentConfig(BaseModel):
    """Validated settings of one deployment; field docs are shown by ``mlflow deployments help``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = Field(
        "process",
        description="process: one local server process; ray: a Ray Serve application "
        "(install mlflow-tfx-plugin[ray]).",
    )
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
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Sequences decoded together (default: as many as the KV cache holds at "
        "128 tokens each, 16 to 64), and requests per embedding batch (default: 16).",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens the paged KV cache holds, shared by all sequences (default: "
        "128 per max_batch_size slot, 16 slots if not set); never less than the context "
        "window.",
    )
    prefix_caching: bool = Field(
        True,
        description="Reuse the KV cache of a prompt prefix (whole 32-token pages) that "
        "another sequence computed, e.g. a shared system prompt; lossless.",
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

    # -- the Ray backend (validated in _check_backend_keys) --
    ray_address: str | None = Field(
        None,
        description=RAY_ONLY + "Ray cluster address (host:port or ray://...). Default: "
        "$RAY_ADDRESS, else a running local cluster, else a local head started for you "
        "and stopped after its last deployment is deleted.",
    )
    num_replicas: int | None = Field(
        None, ge=1, description=RAY_ONLY + "Fixed number of replicas (default: 1)."
    )
    min_replicas: int | None = Field(
        None,
        ge=0,
        description=RAY_ONLY + "Autoscaling lower bound, with max_replicas (default: 1).",
    )
    max_replicas: int | None = Field(
        None, ge=1, description=RAY_ONLY + "Autoscaling upper bound; turns autoscaling on."
    )
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description=RAY_ONLY + "Autoscaling target of requests in flight per replica "
        "(default: max_batch_size, else 16).",
    )
    upscale_delay_s: float | None = Field(
        None,
        ge=0,
        description=RAY_ONLY + "Seconds of high load before adding a replica (default: "
        "Serve's, 30).",
    )
    downscale_delay_s: float | None = Field(
        None,
        ge=0,
        description=RAY_ONLY + "Seconds of low load before removing a replica (default: "
        "Serve's, 600).",
    )
    num_cpus: float | None = Field(
        None, ge=0, description=RAY_ONLY + "CPUs reserved per replica (default: 1)."
    )
    num_gpus: float | None = Field(
        None, ge=0, description=RAY_ONLY + "GPUs reserved per replica (default: 0)."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description=RAY_ONLY + "Requests Serve sends one replica at once (default: "
        "max_concurrent_requests, so the batcher is never starved; Serve's own is 5).",
    )

    @field_validator("torch_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.removeprefix("torch.") not in _TORCH_DTYPES:
            raise ValueError(f"must be one of {', '.join(_TORCH_DTYPES)}")
        return value.removeprefix("torch.") if value else value

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

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


def key_digest(api_key: str) -> str:
    """The sha256 hex digest an API key is checked against (servers keep no more)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def valid_keys() -> list[str]:
    return list(DeploymentConfig.model_fields)


def ray_only_keys() -> list[str]:
    """The keys only ``backend=ray`` reads (their descriptions start with :data:`RAY_ONLY`)."""
    return [
        key
        for key, info in DeploymentConfig.model_fields.items()
        if (info.description or "").startswith(RAY_ONLY)
    ]


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
    _check_backend_keys(parsed)
    return parsed


def _check_backend_keys(config: DeploymentConfig) -> None:
    """Ray keys only with backend=ray; a fixed replica count or autoscaling, not both."""
    given = {key for key in config.model_fields_set if getattr(config, key) is not None}
    ray_keys = sorted(given & set(ray_only_keys()))
    if config.backend == "process" and ray_keys:
        raise InvalidInputError(
            f"{ray_keys[0]} applies to backend=ray only: add -C backend=ray.", param=ray_keys[0]
        )
    autoscaling = sorted(given & {"min_replicas", "max_replicas", "target_ongoing_requests"})
    if "num_replicas" in given and autoscaling:
        raise InvalidInputError(
            f"num_replicas fixes the replica count and {autoscaling[0]} sets autoscaling: "
            "pass one of them.",
            param="num_replicas",
        )
    if autoscaling and config.max_replicas is None:
        raise InvalidInputError(
            f"{autoscaling[0]} needs max_replicas, which turns autoscaling on.",
            param="max_replicas",
        )
    if config.max_replicas is not None and (config.min_replicas or 0) > config.max_replicas:
        raise InvalidInputError(
            f"min_replicas={config.min_replicas} is above max_replicas={config.max_replicas}.",
            param="min_replicas",
        )


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
