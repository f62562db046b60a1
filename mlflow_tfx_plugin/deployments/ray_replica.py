"""One Ray Serve replica of a ``backend=ray`` deployment: the server's FastAPI app in an actor.

Each replica fetches the model itself from the MLflow tracking/artifact store (the tracking
URI and credentials arrive in its runtime environment, see :mod:`.ray_backend`), loads it
with the same engine as a server process, and serves the very app of
:func:`~.server.create_app` through ``serve.ingress``: the same routes, errors, streaming,
API key check (against a digest: the key itself never reaches the cluster) and metrics.
Serve's health check asks the engine, so a replica whose generation loop is down is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

from mlflow_tfx_plugin.deployments.config import DeploymentConfig
from mlflow_tfx_plugin.deployments.server import ServerState, create_app, load_model
from mlflow_tfx_plugin.errors import ModelNotFoundError

_logger = logging.getLogger("mlflow_tfx_plugin.ray_replica")


@dataclass(frozen=True, kw_only=True)
class ReplicaSpec:
    """What a replica is built from: no path on the CLI's machine, no secret."""

    name: str
    model_uri: str  # resolved: models:/NAME/VERSION, runs:/..., models:/m-ID or a directory
    config: dict[str, Any] = field(default_factory=dict)  # DeploymentConfig.server_arguments()
    api_key_sha256: str | None = None


@serve.ingress()
class TfxReplica:
    """A Serve deployment class whose ASGI app is built once the model is loaded."""

    async def __init__(self, spec: ReplicaSpec) -> None:  # type: ignore[misc]  # Serve awaits it
        self._download_dir: Path | None = None
        model_dir = await asyncio.to_thread(self._fetch, spec.model_uri)
        config = DeploymentConfig(**spec.config)
        self._tfx_app = create_app(spec.name, config, api_key_sha256=spec.api_key_sha256)
        await load_model(self._tfx_app, model_dir)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._tfx_app

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        state: ServerState = self._tfx_app.state.tfx
        if state.serving is None or not state.serving.model.healthy:
            raise RuntimeError("The generation loop is down; see this replica's log.")

    def __del__(self) -> None:
        if self._download_dir is not None:
            shutil.rmtree(self._download_dir, ignore_errors=True)

    def _fetch(self, model_uri: str) -> Path:
        """A local directory of the model: downloaded from MLflow, or a directory as it is."""
        parsed = urllib.parse.urlparse(model_uri)
        if parsed.scheme in ("", "file"):
            path = Path(parsed.path if parsed.scheme else model_uri)
            if not path.is_dir():
                raise ModelNotFoundError(
                    f"Model directory {str(path)!r} does not exist on this Ray node: deploy a "
                    "models:/ or runs:/ URI, which every node fetches from the tracking server."
                )
            return path
        import mlflow  # only the replica needs MLflow, to download

        self._download_dir = Path(tempfile.mkdtemp(prefix="tfx-replica-"))
        _logger.info("Downloading %s into %s", model_uri, self._download_dir)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=str(self._download_dir)
        )
        return Path(local)
