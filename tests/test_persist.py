"""Units of persist.py: location resolution, MLflow's private names, verifying and
persisting a sharded snapshot (the download replaced by a local directory), and fetching
from the HF cache (against the in-process Hub double)."""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from test_checkpoint import expected_manifest, sharded_checkpoint

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin import _compat, checkpoint, persist
from mlflow_tfx_plugin.checkpoint import WeightEntry
from mlflow_tfx_plugin.errors import IntegrityError
from mlflow_tfx_plugin.hub import HubReference, download_files
from mlflow_tfx_plugin.persist import artifact_location, persist_at

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the Hub double's package
from integration.hub_server import LocalHub, patch_hf_client


def test_copied_server_env_var_names_match_mlflow():
    from mlflow.server import constants

    assert constants.BACKEND_STORE_URI_ENV_VAR == _compat.BACKEND_STORE_URI_ENV_VAR
    assert constants.ARTIFACTS_DESTINATION_ENV_VAR == _compat.ARTIFACTS_DESTINATION_ENV_VAR


def test_artifact_location_of_each_uri_kind(tiny_gpt2_dir: Path, tracking_uri: str):
    with mlflow.start_run() as run:
        info = tfx.log_model(str(tiny_gpt2_dir), name="model", registered_model_name="loc")
    expected = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location

    assert artifact_location(info.model_uri) == expected
    assert artifact_location("models:/loc/1") == expected
    assert artifact_location("/some/local/path") == "/some/local/path"
    assert artifact_location(f"runs:/{run.info.run_id}/extra").endswith("/extra")


def test_persisting_a_saved_model_is_a_no_op(tiny_gpt2_dir: Path, tmp_path: Path):
    tfx.save_model(tiny_gpt2_dir, tmp_path / "m")
    before = (tmp_path / "m" / "MLmodel").read_text()
    assert persist_at(str(tmp_path / "m")) is None
    assert (tmp_path / "m" / "MLmodel").read_text() == before


def test_non_transformers_models_are_ignored(tmp_path: Path):
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    mlflow.pyfunc.save_model(tmp_path / "echo", python_model=Echo())
    assert persist_at(str(tmp_path / "echo")) is None


def test_sources_without_mlmodel_register_as_mlflow_would(tracking_uri: str, tmp_path: Path):
    (tmp_path / "not-a-model").mkdir()
    client = mlflow.MlflowClient()
    client.create_registered_model("plain")
    version = client.create_model_version("plain", str(tmp_path / "not-a-model"))
    assert int(version.version) == 1


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    return sharded_checkpoint(tmp_path / "snapshot")


@pytest.fixture
def persisting(
    tiny_llama_dir: Path, tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, list[WeightEntry]]:
    """A reference-only model of ``snapshot`` (persisted from it), and its manifest."""
    expected = expected_manifest(snapshot)
    model = _reference_only_model(tiny_llama_dir, tmp_path / "m", expected)
    _persist_from(snapshot, monkeypatch)
    return model, expected


def test_persisting_names_the_corrupt_shard(snapshot: Path, persisting: Any):
    model, expected = persisting
    _corrupt(snapshot / expected[2].path)

    with pytest.raises(IntegrityError, match=f"'{expected[2].path}' has sha256 [0-9a-f]{{64}}"):
        persist_at(str(model))


def test_persisting_refuses_a_missing_shard(snapshot: Path, persisting: Any):
    model, expected = persisting
    (snapshot / expected[-1].path).unlink()
    with pytest.raises(IntegrityError, match=f"'{expected[-1].path}' is missing"):
        persist_at(str(model))


def test_persisting_refuses_a_truncated_shard_before_hashing_or_uploading(
    snapshot: Path, persisting: Any, mocker
):
    model, expected = persisting
    truncated = snapshot / expected[1].path
    truncated.write_bytes(truncated.read_bytes()[:1000])
    hashing = mocker.patch("mlflow_tfx_plugin.checkpoint.sha256_of")
    uploading = mocker.patch.object(persist, "_upload")

    with pytest.raises(
        IntegrityError, match=f"'{expected[1].path}' has 1000 bytes, but {expected[1].size} were"
    ):
        persist_at(str(model))
    hashing.assert_not_called()
    uploading.assert_not_called()


def test_integrity_errors_name_the_commands_that_fetch_the_file_again(
    snapshot: Path, persisting: Any
):
    model, expected = persisting
    _corrupt(snapshot / expected[0].path)

    with pytest.raises(IntegrityError) as raised:
        persist_at(str(model))

    message = str(raised.value)
    assert "`hf cache rm model/org/sharded`" in message
    assert f"`hf download org/sharded {expected[0].path} --revision {'a' * 40}" in message


def _reference_only_model(checkpoint_dir: Path, path: Path, weights: list[WeightEntry]) -> Path:
    """A saved tfx model turned into a reference to a sharded snapshot: weights removed,
    MLmodel pointing at a repo and commit, with the shards' manifest."""
    tfx.save_model(checkpoint_dir, path)
    (path / "model" / "model.safetensors").unlink()
    model = mlflow.models.Model.load(str(path / "MLmodel"))
    model.flavors["tfx"].update(
        reference_only=True,
        source_model_name="org/sharded",
        source_model_revision="a" * 40,
        weights=[entry.to_dict() for entry in weights],
    )
    model.save(str(path / "MLmodel"))
    return path


def _persist_from(snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []

    def download(reference: Any, *, allow: Any = None) -> Path:
        calls.append(reference)
        return snapshot

    monkeypatch.setattr(persist, "download_files", download)
    return calls


def test_persisting_a_sharded_snapshot_uploads_every_verified_shard(
    tiny_llama_dir: Path, tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch
):
    expected = expected_manifest(snapshot)
    model = _reference_only_model(tiny_llama_dir, tmp_path / "m", expected)
    calls = _persist_from(snapshot, monkeypatch)

    result = persist_at(str(model))

    assert [str(ref) for ref in calls] == [f"org/sharded@{'a' * 40}"]
    assert result is not None and result.files == 4
    assert result.bytes == sum(entry.size for entry in expected)
    conf = mlflow.models.Model.load(str(model / "MLmodel")).flavors["tfx"]
    assert conf["reference_only"] is False
    assert conf["weights"] == [entry.to_dict() for entry in expected]
    for entry in expected:
        assert _sha256_of(model / "model" / entry.path) == entry.sha256
    assert (model / "model" / "model.safetensors.index.json").is_file()


def test_one_corrupt_shard_persists_nothing(
    tiny_llama_dir: Path, tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch
):
    expected = expected_manifest(snapshot)
    model = _reference_only_model(tiny_llama_dir, tmp_path / "m", expected)
    before = (model / "MLmodel").read_text()
    _corrupt(snapshot / expected[1].path)
    _persist_from(snapshot, monkeypatch)

    with pytest.raises(IntegrityError, match=expected[1].path):
        persist_at(str(model))

    assert (model / "MLmodel").read_text() == before
    assert not list((model / "model").glob("*.safetensors")), "no shard uploaded"


def test_weight_files_upload_while_they_are_hashed(
    tiny_llama_dir: Path, tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch
):
    """The overlap that makes persisting cost about one read of the weights: a hash that
    waits for an upload to start would wait forever if hashing came first."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    expected = expected_manifest(snapshot)
    model = _reference_only_model(tiny_llama_dir, tmp_path / "m", expected)
    _persist_from(snapshot, monkeypatch)
    uploading = threading.Event()
    real_upload, real_sha256 = LocalArtifactRepository.log_artifacts, checkpoint.sha256_of

    def noted_upload(self: Any, local_dir: str, artifact_path: str | None = None) -> None:
        uploading.set()
        real_upload(self, local_dir, artifact_path)

    def sha256_after_an_upload_started(path: Path, stop: Any = None) -> str:
        if not uploading.wait(timeout=30):
            raise AssertionError("no weight upload started while the weights were hashed")
        return real_sha256(path, stop)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", noted_upload)
    monkeypatch.setattr(checkpoint, "sha256_of", sha256_after_an_upload_started)

    result = persist_at(str(model))

    assert result is not None and result.files == 4
    conf = mlflow.models.Model.load(str(model / "MLmodel")).flavors["tfx"]
    assert conf["weights"] == [entry.to_dict() for entry in expected]


def test_a_failed_upload_leaves_the_reference_in_place_and_a_rerun_finishes(
    tiny_llama_dir: Path, tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch
):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    expected = expected_manifest(snapshot)
    model = _reference_only_model(tiny_llama_dir, tmp_path / "m", expected)
    before = (model / "MLmodel").read_text()
    _persist_from(snapshot, monkeypatch)
    real = LocalArtifactRepository.log_artifacts

    def flaky(self: Any, local_dir: str, artifact_path: str | None = None) -> None:
        """A store that fills up (cannot be made to happen here for real)."""
        if (Path(local_dir) / expected[3].path).exists():
            raise OSError(28, "No space left on device")
        real(self, local_dir, artifact_path)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", flaky)
    with pytest.raises(OSError, match="No space left") as raised:
        persist_at(str(model))

    assert f"Uploading '{expected[3].path}'" in " ".join(raised.value.__notes__)
    assert (model / "MLmodel").read_text() == before, "MLmodel switches only after all uploads"
    assert mlflow.models.Model.load(str(model / "MLmodel")).flavors["tfx"]["reference_only"]

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", real)
    result = persist_at(str(model))

    assert result is not None and result.files == 4
    for entry in expected:
        assert _sha256_of(model / "model" / entry.path) == entry.sha256
    assert not mlflow.models.Model.load(str(model / "MLmodel")).flavors["tfx"]["reference_only"]
    assert persist_at(str(model)) is None, "a persisted model is left alone"


@pytest.fixture
def hub(tiny_gpt2_dir: Path, tmp_path: Path) -> Iterator[LocalHub]:
    local_hub = LocalHub()
    local_hub.add_repo_from_dir("org/tiny", tiny_gpt2_dir)
    with local_hub.serve(), patch_hf_client(local_hub.endpoint, tmp_path / "hf-cache"):
        yield local_hub


def test_a_snapshot_complete_in_the_cache_is_used_without_asking_the_hub(hub: LocalHub):
    reference = HubReference("org/tiny", hub.head("org/tiny"))
    downloaded = download_files(reference)
    hub.clear_requests()

    assert download_files(reference) == downloaded
    assert hub.find_requests() == [], "a cached commit needs no request, not even a probe"


def test_a_snapshot_partly_in_the_cache_is_completed_from_the_hub(hub: LocalHub):
    reference = HubReference("org/tiny", hub.head("org/tiny"))
    snapshot = download_files(reference)
    (snapshot / "config.json").resolve().unlink()  # the blob, and the link to it
    (snapshot / "config.json").unlink()
    hub.clear_requests()

    assert download_files(reference) == snapshot
    assert (snapshot / "config.json").is_file()
    assert hub.downloads("org/tiny") == ["config.json"]
