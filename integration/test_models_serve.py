"""The real ``mlflow models serve`` CLI serves a tfx model through the plugin's pyfunc loader."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    import mlflow_tfx_plugin as tfx

    checkpoint = tiny_models.build_gpt2(tmp_path_factory.mktemp("ckpt") / "gpt2")
    target = tmp_path_factory.mktemp("saved") / "model"
    tfx.save_model(checkpoint, target, model_config={"max_new_tokens": 3, "do_sample": False})
    return target


@pytest.fixture(scope="module")
def served_url(saved_gpt2: Path) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(saved_gpt2)]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_until_ready(url: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow models serve exited early:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("mlflow models serve did not become ready")


def test_serve_predicts_text(served_url: str):
    response = requests.post(
        f"{served_url}/invocations", json={"inputs": ["Hello", "Paris is"]}, timeout=60
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    assert all(isinstance(text, str) for text in predictions)


def test_serve_params_override(served_url: str):
    short = requests.post(
        f"{served_url}/invocations",
        json={"inputs": ["Hello"], "params": {"max_new_tokens": 1}},
        timeout=60,
    ).json()["predictions"][0]
    longer = requests.post(
        f"{served_url}/invocations",
        json={"inputs": ["Hello"], "params": {"max_new_tokens": 6}},
        timeout=60,
    ).json()["predictions"][0]
    assert longer.startswith(short) and len(longer) > len(short)


def test_serve_bad_input_is_a_400(served_url: str):
    response = requests.post(
        f"{served_url}/invocations",
        json={"dataframe_split": {"columns": ["text"], "data": [[1.5]]}},
        timeout=60,
    )
    assert response.status_code == 400
    assert "error_code" in response.json()
