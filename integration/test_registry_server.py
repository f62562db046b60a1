"""Registering a reference-only model persists its weights first: with a real ``mlflow server``
(sqlite backend, proxied artifacts, 127.0.0.1) and a local Hub double.

Both processes run in this environment, where the plugin is installed. "Installed only on
the client" is emulated by starting the server with ``MLFLOW_TFX_AUTO_PERSIST=false``, and
"only on the server" by setting it in the client.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

import mlflow_tfx_plugin as tfx
from integration import servers
from integration.hub_server import LocalHub, hf_client_env, patch_hf_client

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402

REPO = "org/tiny-gpt2"
UNCACHED_REPO = "org/tiny-gpt2-fresh"
GREEDY = {"max_new_tokens": 3, "do_sample": False}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    checkpoint = tiny_models.build_gpt2(tmp_path_factory.mktemp("ckpt") / "gpt2")
    local_hub = LocalHub()
    local_hub.add_repo_from_dir(REPO, checkpoint)
    local_hub.add_repo_from_dir(UNCACHED_REPO, checkpoint)
    with local_hub.serve():
        yield local_hub


@pytest.fixture
def client_hub(hub: LocalHub, tmp_path: Path) -> Iterator[LocalHub]:
    hub.clear_requests()
    with patch_hf_client(hub.endpoint, tmp_path / "client-cache"):
        yield hub


@contextlib.contextmanager
def _start_server(tmp_path: Path, hub: LocalHub, *, auto_persist: bool) -> Iterator[str]:
    """``mlflow server`` (sqlite, proxied artifacts) with its own HF cache; yields its URL."""
    env = {
        **os.environ,
        **hf_client_env(hub.endpoint, tmp_path / "server-cache"),
        "MLFLOW_TFX_AUTO_PERSIST": "true" if auto_persist else "false",
    }
    with servers.mlflow_server(
        backend_store_uri=f"sqlite:///{tmp_path / 'server.db'}",
        artifacts_destination=tmp_path / "server-artifacts",
        log=tmp_path / "server.log",
        env=env,
    ) as server:
        yield server.url


@pytest.fixture(
    scope="module",
    params=["client", "server", "both"],
    ids=["plugin-on-client", "plugin-on-server", "plugin-on-both"],
)
def server(
    request: pytest.FixtureRequest, hub: LocalHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp(f"server-{request.param}")
    auto_persist = request.param in ("server", "both")
    previous = os.environ.get("MLFLOW_TFX_AUTO_PERSIST")
    with _start_server(tmp_path, hub, auto_persist=auto_persist) as url:
        os.environ["MLFLOW_TFX_AUTO_PERSIST"] = "false" if request.param == "server" else "true"
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("registry")
        try:
            yield url
        finally:
            mlflow.set_tracking_uri(None)
            if previous is None:
                os.environ.pop("MLFLOW_TFX_AUTO_PERSIST", None)
            else:
                os.environ["MLFLOW_TFX_AUTO_PERSIST"] = previous


def test_register_persists_reference_before_the_version_exists(
    client_hub: LocalHub, server: str, tmp_path: Path
):
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model")
    assert info.flavors["tfx"]["reference_only"] is True

    version = mlflow.register_model(info.model_uri, "chat")

    conf = mlflow.models.get_model_info(f"models:/chat/{version.version}").flavors["tfx"]
    assert conf["reference_only"] is False
    weights = [
        r
        for r in client_hub.requests
        if r.method == "GET" and str(r.filename).endswith(".safetensors")
    ]
    assert len(weights) == 1, "fetched once, even with the plugin on both sides"
    with patch_hf_client("http://127.0.0.1:9", tmp_path / "empty-cache"):  # no Hub, no cache
        pipe = tfx.load_model(f"models:/chat/{version.version}")
        assert pipe("Hello", **GREEDY)


def test_a_logged_checkpoint_uploads_its_weights_through_the_server(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The weights go to the logged model's ``mlflow-artifacts:`` location over HTTP while
    they are hashed; MLflow's copy of the other files lands beside them."""
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    checkpoint = tiny_models.build_gpt2(tmp_path / "gpt2")
    uploaded: list[list[str]] = []
    real = HttpArtifactRepository.log_artifacts

    def noted(self: Any, local_dir: str, artifact_path: str | None = None) -> None:
        uploaded.append(sorted(p.name for p in Path(local_dir).rglob("*") if p.is_file()))
        real(self, local_dir, artifact_path)

    monkeypatch.setattr(HttpArtifactRepository, "log_artifacts", noted)
    with mlflow.start_run():
        info = tfx.log_model(str(checkpoint), name="model")
    [entry] = info.flavors["tfx"]["weights"]
    assert uploaded[0] == [entry["path"]], "the weights upload on their own, first"
    assert not any(entry["path"] in files for files in uploaded[1:]), "and only once"

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    stored = local / "model" / entry["path"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == entry["sha256"]
    assert (local / "model" / "config.json").is_file() and (local / "MLmodel").is_file()
    assert tfx.load_model(info.model_uri)("Hello", **GREEDY)


def test_failed_persist_creates_no_version(client_hub: LocalHub, server: str):
    # A repo no cache has seen yet, so the download must reach the failing Hub.
    with mlflow.start_run():
        info = tfx.log_model(UNCACHED_REPO, name="model")
    # GET only: huggingface_hub does not retry a failed body download (it backs off on HEAD).
    client_hub.set_faults(
        path_glob="*.safetensors", scope="resolve", methods=("GET",), status_code=500
    )
    try:
        with pytest.raises(mlflow.exceptions.MlflowException, match="Downloading org/"):
            mlflow.register_model(info.model_uri, "broken")
    finally:
        client_hub.clear_faults()
    versions = mlflow.MlflowClient().search_model_versions("name='broken'")
    assert versions == [], "no model version may point at missing weights"
