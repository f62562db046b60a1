"""Model URIs for deployments: pinned to a version once, then fetched into the model cache.

:func:`resolve_model` turns registry aliases, stages and ``latest`` into a version number
(recorded by the client, so an update of the alias does not move a deployment);
:func:`fetch_model` downloads a resolved model once into the store's cache and checks that
it is a model the server can load.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from mlflow_tfx_plugin import _compat
from mlflow_tfx_plugin.deployments.process import say
from mlflow_tfx_plugin.deployments.state import DeploymentStore
from mlflow_tfx_plugin.errors import InvalidInputError, ModelNotFoundError, TfxError
from mlflow_tfx_plugin.flavor_config import FLAVOR_NAME, STOCK_FLAVOR_NAME


@dataclass(frozen=True, kw_only=True)
class ResolvedModel:
    """A model URI pinned to what it pointed at when the deployment was made."""

    model_uri: str
    resolved_model_uri: str
    cache_key: str | None = None  # None: a local directory used in place
    registered_model_name: str | None = None
    model_version: str | None = None
    model_id: str | None = None
    run_id: str | None = None


#: The ResolvedModel fields a deployment record keeps (not the download cache key).
RECORDED_MODEL_FIELDS = (
    "model_uri",
    "resolved_model_uri",
    "registered_model_name",
    "model_version",
    "model_id",
    "run_id",
)


def recorded_fields(resolved: ResolvedModel) -> dict[str, Any]:
    """What a deployment record keeps of ``resolved`` (:data:`RECORDED_MODEL_FIELDS`)."""
    return {key: getattr(resolved, key) for key in RECORDED_MODEL_FIELDS}


def resolved_of(record: Any) -> ResolvedModel:
    """The pinned model a deployment record was made from (without its cache key)."""
    return ResolvedModel(**{key: getattr(record, key) for key in RECORDED_MODEL_FIELDS})


def resolve_model(model_uri: str) -> ResolvedModel:
    """Pin ``model_uri``: registry aliases, stages and ``latest`` become a version number.

    Raises:
        InvalidInputError: an empty URI.
        ModelNotFoundError: a registry URI that names no version, a missing local path.
    """
    if not isinstance(model_uri, str) or not model_uri.strip():
        raise InvalidInputError(f"A model URI is required, got {model_uri!r}.", param="model_uri")
    scheme = urllib.parse.urlparse(model_uri).scheme
    if scheme == "models":
        return _resolve_registry_uri(model_uri)
    if scheme == "runs":
        parts = urllib.parse.urlparse(model_uri).path.strip("/").split("/")
        key = _cache_key(f"run-{parts[0]}", mlflow.get_tracking_uri(), model_uri)
        return ResolvedModel(
            model_uri=model_uri, resolved_model_uri=model_uri, cache_key=key, run_id=parts[0]
        )
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = Path(urllib.parse.urlparse(model_uri).path if scheme == "file" else model_uri)
        if not path.expanduser().is_dir():
            raise ModelNotFoundError(f"Model directory {str(path)!r} does not exist.")
        local = str(path.expanduser().resolve())
        return ResolvedModel(model_uri=model_uri, resolved_model_uri=local)
    key = _cache_key(scheme, "", model_uri)
    return ResolvedModel(model_uri=model_uri, resolved_model_uri=model_uri, cache_key=key)


def _resolve_registry_uri(model_uri: str) -> ResolvedModel:
    client = mlflow.MlflowClient()
    try:
        ident = _compat.get_model_name_and_version(client, model_uri)
        if len(ident) == 1:
            logged = client.get_logged_model(ident[0])
            key = _cache_key(ident[0], mlflow.get_tracking_uri(), ident[0])
            return ResolvedModel(
                model_uri=model_uri,
                resolved_model_uri=f"models:/{ident[0]}",
                cache_key=key,
                model_id=ident[0],
                run_id=logged.source_run_id,
            )
        name, version = ident
        mv = client.get_model_version(name, version)
    except MlflowException as err:
        raise ModelNotFoundError(
            f"Cannot resolve model URI {model_uri!r}: {err.message} "
            "Check the name, version or alias with `mlflow models` / the MLflow UI, and that "
            "MLFLOW_TRACKING_URI points at the right server."
        ) from err
    if mv.model_id:
        key = _cache_key(f"{name}-v{version}", mlflow.get_tracking_uri(), mv.model_id)
    else:
        key = _cache_key(f"{name}-v{version}", mlflow.get_registry_uri(), str(mv.source))
    return ResolvedModel(
        model_uri=model_uri,
        resolved_model_uri=f"models:/{name}/{version}",
        cache_key=key,
        registered_model_name=name,
        model_version=str(version),
        model_id=mv.model_id,
        run_id=mv.run_id,
    )


def _cache_key(label: str, store_uri: str, identity: str) -> str:
    digest = hashlib.sha256(f"{store_uri}\n{identity}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._-")[:40] or "model"
    return f"{slug}-{digest}"


def fetch_model(store: DeploymentStore, resolved: ResolvedModel) -> Path:
    """The local directory of ``resolved``: downloaded once into the store's model cache.

    Raises:
        InvalidInputError: the directory holds no MLflow model of the ``tfx`` flavor.
    """
    if resolved.cache_key is None:
        model_dir = Path(resolved.resolved_model_uri)
    else:

        def download(tmp: Path) -> Path:
            say(f"Downloading model {resolved.resolved_model_uri}...")
            uri = resolved.resolved_model_uri
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))

        try:
            model_dir, fresh = store.cached_model(resolved.cache_key, download)
        except MlflowException as err:
            if isinstance(err, TfxError):
                raise
            raise ModelNotFoundError(
                f"Cannot download model {resolved.resolved_model_uri!r}: {err.message}"
            ) from err
        if not fresh:
            say(f"Using cached model {model_dir}")
    _check_mlmodel(model_dir, resolved.model_uri)
    return model_dir


def _check_mlmodel(model_dir: Path, model_uri: str) -> None:
    if not (model_dir / "MLmodel").is_file():
        raise InvalidInputError(
            f"{model_uri!r} is not an MLflow model (no MLmodel file in {model_dir}).",
            param="model_uri",
        )
    flavors = mlflow.models.Model.load(str(model_dir)).flavors
    if FLAVOR_NAME not in flavors and STOCK_FLAVOR_NAME not in flavors:
        raise InvalidInputError(
            f"Model {model_uri!r} has flavors {sorted(flavors)}; the tfx target serves models "
            "logged with mlflow_tfx_plugin (flavor 'tfx') or mlflow.transformers.",
            param="model_uri",
        )
