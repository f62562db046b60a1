"""Units of persist.py that need no Hub: location resolution and MLflow's private names."""

from __future__ import annotations

from pathlib import Path

import mlflow

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin import _compat
from mlflow_tfx_plugin.persist import artifact_location, persist_at


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
