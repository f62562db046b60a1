"""The Ray backend without a cluster: its errors, the Serve options it builds, what it imports.

The cluster itself (replicas, rolling updates, autoscaling, the head we start) is tested for
real in integration/test_ray_backend.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_tfx_plugin.deployments import TfxDeploymentClient, ray_backend, ray_cluster
from mlflow_tfx_plugin.deployments.client import run_local
from mlflow_tfx_plugin.deployments.config import key_digest, parse_config
from mlflow_tfx_plugin.deployments.process import free_port
from mlflow_tfx_plugin.deployments.resolve import ResolvedModel
from mlflow_tfx_plugin.deployments.state import DeploymentRecord, DeploymentStore
from mlflow_tfx_plugin.errors import InvalidInputError

RESOLVED = ResolvedModel(model_uri="models:/chat@prod", resolved_model_uri="models:/chat/3")


def test_without_ray_installed_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray is installed here: make it missing
    client = TfxDeploymentClient(f"tfx:{tmp_path}")
    with pytest.raises(InvalidInputError) as info:
        client.create_deployment(
            "chat", str(tmp_path), config={"backend": "ray", "ray_address": "auto"}
        )
    assert 'pip install "mlflow-tfx-plugin[ray]"' in info.value.message
    assert info.value.param == "backend" and info.value.get_http_status_code() == 400


def test_an_unreachable_ray_address_names_the_address_and_the_fix(tmp_path: Path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = DeploymentStore(tmp_path)
    with pytest.raises(InvalidInputError) as info, ray_cluster.connected(store, address):
        pass
    assert address in info.value.message and "ray start --head" in info.value.message
    assert info.value.param == "ray_address"


@pytest.mark.parametrize("address", ["nonsense", "ray://", "host:notaport"])
def test_a_malformed_ray_address_is_rejected(tmp_path: Path, address: str):
    store = DeploymentStore(tmp_path)
    with (
        pytest.raises(InvalidInputError, match="Invalid ray_address") as info,
        ray_cluster.connected(store, address),
    ):
        pass
    assert info.value.param == "ray_address"


def test_serve_options_default_for_continuous_batching_and_one_replica():
    cfg = parse_config({"backend": "ray", "max_concurrent_requests": "48"}, environ={})
    options = ray_backend.deployment_options(cfg, environ={})
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 48, "Serve's default of 5 starves the batcher"
    assert options["ray_actor_options"]["num_cpus"] == 1
    assert options["max_surge_percent"] == 100, "replacements start before old replicas stop"
    assert options["graceful_shutdown_timeout_s"] > cfg.timeout


def test_serve_autoscaling_options_come_from_the_config():
    raw = {
        "backend": "ray",
        "max_replicas": "4",
        "downscale_delay_s": "2",
        "max_batch_size": "8",
        "num_gpus": "1",
    }
    options = ray_backend.deployment_options(parse_config(raw, environ={}), environ={})
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 8,  # a replica counts as busy once its batch is full
        "downscale_delay_s": 2.0,
    }
    assert options["ray_actor_options"]["num_gpus"] == 1


def test_replicas_get_the_tracking_uri_and_credentials_but_nothing_else():
    environ = {
        "MLFLOW_TRACKING_URI": "http://tracking.internal:5000",
        "MLFLOW_TRACKING_TOKEN": "t0ken",
        "AWS_ACCESS_KEY_ID": "AKIA...",
        "HOME": "/root",
        "MLFLOW_TFX_API_KEY": "the-deployment-key",
        "SOME_OTHER_SECRET": "x",
    }
    cfg = parse_config({"backend": "ray"}, environ={})
    env_vars = ray_backend.deployment_options(cfg, environ=environ)["ray_actor_options"][
        "runtime_env"
    ]["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://tracking.internal:5000"
    assert env_vars["MLFLOW_TRACKING_TOKEN"] == "t0ken"
    assert env_vars["AWS_ACCESS_KEY_ID"] == "AKIA..."
    assert {"HOME", "MLFLOW_TFX_API_KEY", "SOME_OTHER_SECRET"}.isdisjoint(env_vars)
    assert env_vars["MALLOC_ARENA_MAX"] == "2", "replicas keep two glibc heaps, as servers do"


def test_the_api_key_reaches_the_cluster_only_as_a_digest():
    cfg = parse_config({"backend": "ray", "api_key": "s3cret-key"}, environ={})
    spec = ray_backend.replica_spec("chat", RESOLVED, cfg)
    assert spec.api_key_sha256 == key_digest("s3cret-key")
    assert spec.model_uri == "models:/chat/3", "replicas fetch the pinned version"
    dumped = json.dumps(
        {"spec": spec.__dict__, "options": ray_backend.deployment_options(cfg)}, default=str
    )
    assert "s3cret-key" not in dumped


def test_run_local_refuses_the_ray_backend(tmp_path: Path):
    with pytest.raises(InvalidInputError, match="process backend") as info:
        run_local("chat", str(tmp_path), config={"backend": "ray"})
    assert info.value.param == "backend"


def test_an_update_cannot_move_a_deployment_to_another_backend(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    store.write(
        DeploymentRecord(
            name="chat",
            model_uri="m",
            resolved_model_uri="m",
            local_model_dir=str(tmp_path),
            pid=1,
            pid_create_time=0.0,
            host="127.0.0.1",
            port=1,
            url="http://127.0.0.1:1",
            log_path="",
            config={"backend": "process", "host": "127.0.0.1"},
        )
    )
    with pytest.raises(InvalidInputError, match="cannot move") as info:
        TfxDeploymentClient(f"tfx:{tmp_path}").update_deployment("chat", config={"backend": "ray"})
    assert info.value.param == "backend"


def test_the_process_backend_imports_no_ray():
    code = (
        "import sys\n"
        "from mlflow_tfx_plugin.deployments import TfxDeploymentClient, client, usage\n"
        "from mlflow_tfx_plugin.deployments.config import parse_config\n"
        "parse_config({'max_batch_size': '2'})\n"
        "usage.target_help()\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_head_record_is_not_taken_for_a_deployment(tmp_path: Path):
    store = DeploymentStore(tmp_path)
    (tmp_path / "ray").mkdir()
    (tmp_path / ray_cluster.HEAD_RECORD).write_text("{}")
    assert store.records() == []
