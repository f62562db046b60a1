"""``mlflow models serve`` with its default environment manager (virtualenv) serves a tfx model.

MLflow builds a fresh virtualenv from the model's ``requirements.txt``, which pins
``mlflow-tfx-plugin``. Where no index has that version, the plugin's wheel is found through
pip's own configuration (``PIP_FIND_LINKS``), as README says. Slow: the environment installs
mlflow, transformers and torch (about 5 minutes here, from the local package mirror).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from mlflow_tfx_plugin.deployments.process import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SERVE_TIMEOUT_S = 1500


@pytest.mark.timeout(SERVE_TIMEOUT_S + 300)
def test_models_serve_with_the_default_env_manager(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    import mlflow_tfx_plugin as tfx

    model = tmp_path / "model"
    checkpoint = tiny_models.build_gpt2(tmp_path / "gpt2")
    tfx.save_model(checkpoint, model, model_config={"max_new_tokens": 3, "do_sample": False})
    assert "mlflow-tfx-plugin==" in (model / "requirements.txt").read_text()
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)]
    subprocess.run(build, check=True, timeout=300)

    port = free_port()
    env = {
        **os.environ,
        # pip's own setting, as a user would set it; keeps any find-links already configured
        "PIP_FIND_LINKS": " ".join(filter(None, [os.environ.get("PIP_FIND_LINKS"), str(wheels)])),
        "MLFLOW_ENV_ROOT": str(tmp_path / "envs"),  # not the user's ~/.mlflow/envs
        "HF_HUB_OFFLINE": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]  # no --env-manager: the default
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(f"http://127.0.0.1:{port}", proc, log)
        response = requests.post(
            f"http://127.0.0.1:{port}/invocations", json={"inputs": ["Hello"]}, timeout=120
        )
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert isinstance(prediction, str) and prediction
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert any((tmp_path / "envs").iterdir()), "MLflow built a virtualenv for the model"


def _wait_until_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited early:\n{log.read_text()[-6000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise TimeoutError(f"mlflow models serve was not ready in time:\n{log.read_text()[-6000:]}")
