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
from pathlib import Path

import pytest
import requests

from integration import servers

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

    env = {
        **os.environ,
        # pip's own setting, as a user would set it; keeps any find-links already configured
        "PIP_FIND_LINKS": " ".join(filter(None, [os.environ.get("PIP_FIND_LINKS"), str(wheels)])),
        "MLFLOW_ENV_ROOT": str(tmp_path / "envs"),  # not the user's ~/.mlflow/envs
        "HF_HUB_OFFLINE": "1",
    }
    with servers.models_serve(
        model,
        log=tmp_path / "serve.log",
        env=env,
        env_manager=None,  # the default: virtualenv
        startup_timeout_s=SERVE_TIMEOUT_S,
    ) as server:
        response = requests.post(
            f"{server.url}/invocations", json={"inputs": ["Hello"]}, timeout=120
        )
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert isinstance(prediction, str) and prediction
    assert any((tmp_path / "envs").iterdir()), "MLflow built a virtualenv for the model"
