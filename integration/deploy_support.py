"""What the deployment target's integration tests share: a registry of chat models, the CLI,
waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow

import mlflow_tfx_plugin as tfx

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}


def register_chat_models(root: Path, *, prod_alias: bool = False) -> str:
    """A sqlite store under ``root`` with ``chat`` v1 and v2 (tiny GPT-2, llm/v1/chat), and
    with ``prod_alias`` the alias prod -> v1; its URI."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    checkpoint = tiny_models.build_gpt2(root / "gpt2")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("chat", artifact_location=(root / "a").as_uri())
        for _ in range(2):
            with mlflow.start_run(experiment_id=experiment):
                tfx.log_model(
                    str(checkpoint), name="model", task="llm/v1/chat", registered_model_name="chat"
                )
        if prod_alias:
            mlflow.MlflowClient().set_registered_model_alias("chat", "prod", "1")
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


def deployment_env(tracking_uri: str, state_dir: Path) -> dict[str, str]:
    """This process's environment for the CLI, with no Ray address, token mode or API key."""
    environ = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_TFX_STATE_DIR": str(state_dir),
        "MLFLOW_TFX_STARTUP_TIMEOUT": "300",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("RAY_ADDRESS", "MLFLOW_TFX_API_KEY", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        environ.pop(key, None)
    return environ


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mlflow", "deployments", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    if check:
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def described(env: dict[str, str], name: str) -> dict[str, Any]:
    """``get -t tfx`` through the Python client (the CLI prints the same dict), in a child
    process as a user's command would be: Ray reads its auth settings once per process, and
    the tests talk to clusters with and without a token."""
    code = (
        "import json, sys; from mlflow.deployments import get_deploy_client; "
        "print(json.dumps(get_deploy_client(sys.argv[1]).get_deployment(sys.argv[2]), default=str))"
    )
    target = f"tfx:{env['MLFLOW_TFX_STATE_DIR']}"
    done = subprocess.run(
        [sys.executable, "-c", code, target, name], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"get {name}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
