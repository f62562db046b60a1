"""Persisting under failure: a process killed mid-persist, concurrent registrations.

Never a model version pointing at partial weights: the MLmodel switches last.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

import mlflow_tfx_plugin as tfx
from integration.hub_server import LocalHub, hf_client_env, patch_hf_client
from mlflow_tfx_plugin.errors import HubError

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402

REPO = "org/tiny-gpt2"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    checkpoint = tiny_models.build_gpt2(tmp_path / "gpt2")
    local_hub = LocalHub()
    local_hub.add_repo_from_dir(REPO, checkpoint)
    with local_hub.serve(), patch_hf_client(local_hub.endpoint, tmp_path / "hf-cache"):
        yield local_hub


@pytest.fixture
def store_env(tmp_path: Path, hub: LocalHub) -> Iterator[dict[str, str]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("faults", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    yield {
        **os.environ,
        **hf_client_env(hub.endpoint, tmp_path / "child-cache"),
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(ROOT),
    }
    mlflow.set_tracking_uri(None)


def _python(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_persist_leaves_a_loadable_reference_and_reruns(
    hub: LocalHub, store_env: dict[str, str]
):
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model")
    hub.set_faults(path_glob="*.safetensors", chunk_delay_s=0.5)  # a slow download to kill
    child = _python(
        f"import mlflow_tfx_plugin as t; t.persist_pretrained_model({info.model_uri!r})", store_env
    )
    deadline = time.monotonic() + 60
    while not any(str(r.filename).endswith(".safetensors") for r in hub.requests):
        assert time.monotonic() < deadline and child.poll() is None, (
            child.stdout.read() if child.stdout else ""
        )
        time.sleep(0.1)
    time.sleep(1.0)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    hub.clear_faults()

    assert mlflow.models.get_model_info(info.model_uri).flavors["tfx"]["reference_only"] is True
    assert tfx.load_model(info.model_uri)("Hi", max_new_tokens=2, do_sample=False)

    assert tfx.persist_pretrained_model(info.model_uri) is not None  # the re-run finishes the job
    conf = mlflow.models.get_model_info(info.model_uri).flavors["tfx"]
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert conf["reference_only"] is False
    assert _sha256(local / "model" / "model.safetensors") == conf["weights"][0]["sha256"]


def test_two_processes_register_the_same_reference(hub: LocalHub, store_env: dict[str, str]):
    with mlflow.start_run():
        info = tfx.log_model(REPO, name="model")
    mlflow.MlflowClient().create_registered_model("shared")
    code = f"import mlflow; mlflow.register_model({info.model_uri!r}, 'shared')"
    children = [_python(code, store_env) for _ in range(2)]
    outputs = [child.communicate(timeout=180)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs

    versions = mlflow.MlflowClient().search_model_versions("name='shared'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    conf = mlflow.models.get_model_info("models:/shared/2").flavors["tfx"]
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert conf["reference_only"] is False
    assert _sha256(local / "model" / "model.safetensors") == conf["weights"][0]["sha256"]


def test_registration_with_the_hub_unreachable_names_the_fixes_that_apply(tmp_path: Path):
    """The Hub goes away between logging and registering: the error gives the fixes that
    work without that Hub (a mirror, a token, the offline cache, no auto-persist), not
    "persist first", which needs the same Hub."""
    local_hub = LocalHub()
    local_hub.add_repo_from_dir(REPO, tiny_models.build_gpt2(tmp_path / "gpt2"))
    local_hub.start()
    try:
        with patch_hf_client(local_hub.endpoint, tmp_path / "hf-cache"):
            with mlflow.start_run(experiment_id=_experiment(tmp_path)):
                info = tfx.log_model(REPO, name="model")
            local_hub.stop()  # its port now refuses connections
            with pytest.raises(HubError) as error:
                mlflow.register_model(info.model_uri, "unreachable")
    finally:
        local_hub.stop()
        mlflow.set_tracking_uri(None)

    message = error.value.message
    assert "does not answer" in message and "local HF cache does not hold it" in message
    for fix in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE=1", "MLFLOW_TFX_AUTO_PERSIST=false"):
        assert fix in message
    assert "persist_pretrained_model" not in message


def test_registration_with_the_hub_unreachable_uses_the_local_cache(tmp_path: Path):
    """A snapshot already in the HF cache is persisted without waiting for the dead Hub."""
    local_hub = LocalHub()
    local_hub.add_repo_from_dir(REPO, tiny_models.build_gpt2(tmp_path / "gpt2"))
    local_hub.start()
    try:
        with patch_hf_client(local_hub.endpoint, tmp_path / "hf-cache"):
            with mlflow.start_run(experiment_id=_experiment(tmp_path)):
                info = tfx.log_model(REPO, name="model")
            tfx.load_model(info.model_uri)  # fills the HF cache with the weights
            local_hub.stop()
            version = mlflow.register_model(info.model_uri, "cached")
            conf = mlflow.models.get_model_info(f"models:/cached/{version.version}").flavors
    finally:
        local_hub.stop()
        mlflow.set_tracking_uri(None)
    assert conf["tfx"]["reference_only"] is False


def _experiment(tmp_path: Path) -> str:
    """A fresh sqlite store (reset by the caller) and an experiment in it."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.create_experiment("unreachable", artifact_location=(tmp_path / "a").as_uri())
