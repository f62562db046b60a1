"""The ``tfx`` deployment target end to end, through the real ``mlflow deployments`` CLI.

A tiny GPT-2 chat model is logged twice to a temporary sqlite tracking store and registered
as ``chat`` (versions 1 and 2, alias ``prod`` -> 1). Every CLI call is a subprocess with
``MLFLOW_TRACKING_URI`` and ``MLFLOW_TFX_STATE_DIR`` pointing into ``tmp_path``; every
server a test starts is stopped by the ``state_dir`` fixture, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from integration import servers
from integration.deploy_support import cli, register_chat_models
from mlflow_tfx_plugin.deployments import TfxDeploymentClient
from mlflow_tfx_plugin.deployments.config import valid_keys
from mlflow_tfx_plugin.deployments.process import free_port

pytestmark = pytest.mark.integration

CHAT_BODY = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite store with ``chat`` v1 and v2 (tiny GPT-2, llm/v1/chat), alias prod -> v1."""
    return register_chat_models(tmp_path_factory.mktemp("registry"), prod_alias=True)


@pytest.fixture(scope="module")
def module_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the module's tests, so the model cache is filled once."""
    return tmp_path_factory.mktemp("tfx-state")


@pytest.fixture
def state_dir(module_state_dir: Path) -> Iterator[Path]:
    """The state dir; afterwards every recorded server is killed and its record removed."""
    yield module_state_dir
    for path in module_state_dir.glob("*.json"):
        record = json.loads(path.read_text())
        _kill(record["pid"], record["pid_create_time"])
        path.unlink()


@pytest.fixture
def env(tracking_uri: str, state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_TFX_STATE_DIR": str(state_dir),
        "MLFLOW_TFX_STARTUP_TIMEOUT": "300",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _kill(pid: int, create_time: float) -> None:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) < 0.05:
            proc.kill()
            proc.wait(10)
    except psutil.Error:
        pass


def _get(env: dict[str, str], name: str) -> dict[str, str]:
    """``mlflow deployments get`` output (``key: value`` lines) as a dict of strings."""
    out = cli(env, "get", "-t", "tfx", "--name", name).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


# --- tests ---------------------------------------------------------------------------------


def test_help_documents_every_key(env: dict[str, str]):
    out = cli(env, "help", "-t", "tfx").stdout
    for key in valid_keys():
        assert f"  {key} " in out
    assert "mlflow deployments create -t tfx" in out


def test_bad_config_key_lists_valid_keys(env: dict[str, str], state_dir: Path):
    result = cli(
        env, "create", "-t", "tfx", "--name", "chat", "-m", "models:/chat/1",
        "-C", "max_batch=4", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"Valid keys: {', '.join(valid_keys())}" in result.stderr
    assert not list(state_dir.glob("*.json"))
    assert not list(state_dir.glob("*.lock"))


@pytest.mark.parametrize(
    "args",
    [
        ("get", "-t", "tfx", "--name", "nope"),
        ("delete", "-t", "tfx", "--name", "nope"),
        ("create", "-t", "tfx", "--name", "x", "-m", "models:/chat/1", "-C", "max_batch_size=lots"),
        ("create", "-t", "tfx", "--name", "x", "-m", "models:/no-such-model/1"),
    ],
    ids=["get unknown", "delete unknown", "bad value", "unknown model"],
)
def test_cli_errors_are_one_line_without_a_traceback(
    env: dict[str, str], state_dir: Path, args: tuple[str, ...]
):
    result = cli(env, *args, check=False)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert not list(state_dir.glob("*.lock")), "no lock file for a name that never existed"


def test_cli_error_traceback_is_shown_under_debug_logging(env: dict[str, str]):
    debug = {**env, "MLFLOW_LOGGING_LEVEL": "DEBUG"}
    result = cli(debug, "get", "-t", "tfx", "--name", "nope", check=False)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "Error: No tfx deployment named" in result.stderr


def test_create_list_get_predict_update_delete(
    env: dict[str, str], state_dir: Path, tmp_path: Path
):
    out = cli(
        env, "create", "-t", "tfx", "--name", "chat", "-m", "models:/chat@prod",
        "-C", "max_batch_size=4",
    )  # fmt: skip
    assert "tfx deployment chat is created" in out.stdout
    assert "Ready at http://127.0.0.1:" in out.stderr

    listed = cli(env, "list", "-t", "tfx").stdout
    assert "'name': 'chat'" in listed and "'status': 'running'" in listed
    assert "local_model_dir" not in listed, "list shows name, status and url, not whole records"
    first = _get(env, "chat")
    assert (first["status"], first["model_version"]) == ("running", "1")
    assert first["resolved_model_uri"] == "models:/chat/1"
    assert first["model_uri"] == "models:/chat@prod"
    assert "'max_batch_size': 4" in first["config"]
    assert requests.get(f"{first['url']}/health", timeout=5).json()["status"] == "ready"

    body = tmp_path / "body.json"
    body.write_text(json.dumps(CHAT_BODY))
    answer = json.loads(cli(env, "predict", "-t", "tfx", "--name", "chat", "-I", str(body)).stdout)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] <= 5

    client = TfxDeploymentClient(f"tfx:{state_dir}")
    chunks = list(client.predict_stream("chat", CHAT_BODY))
    assert chunks and chunks[0]["object"] == "chat.completion.chunk"

    # update while a client keeps sending requests to the original URL: none may fail
    update = ("update", "-t", "tfx", "--name", "chat", "-m", "models:/chat/2")
    outcomes = _keep_requesting(first["url"], lambda: cli(env, *update))
    assert outcomes["failures"] == [], outcomes
    assert outcomes["successes"] > 0 and len(outcomes["pids"]) == 2, outcomes
    second = _get(env, "chat")
    assert (second["status"], second["model_version"]) == ("running", "2")
    assert second["url"] == first["url"] and second["pid"] != first["pid"]
    assert "'max_batch_size': 4" in second["config"]
    assert not _same_process(first)
    health = requests.get(f"{first['url']}/health", timeout=5).json()
    assert health["pid"] == int(second["pid"])

    cli(env, "delete", "-t", "tfx", "--name", "chat")
    assert not _same_process(second)
    assert "[]" in cli(env, "list", "-t", "tfx").stdout
    gone = cli(env, "get", "-t", "tfx", "--name", "chat", check=False)
    assert gone.returncode != 0 and "No tfx deployment named 'chat'" in gone.stderr


def _keep_requesting(url: str, action: Any) -> dict[str, Any]:
    """Run ``action`` while a thread POSTs chat requests to ``url``, one every 20 ms.

    Each request opens a new connection (plain ``requests.post``), as a fresh client would.
    Counts the 200s, collects every other outcome, and the server pids seen in ``/health``
    polled on the same URL.
    """
    outcomes: dict[str, Any] = {"successes": 0, "failures": [], "pids": set()}
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            try:
                reply = requests.post(f"{url}/v1/chat/completions", json=CHAT_BODY, timeout=60)
                health = requests.get(f"{url}/health", timeout=60)
            except requests.RequestException as err:  # every failure is a test failure
                outcomes["failures"].append(repr(err))
                continue
            for response in (reply, health):
                if response.status_code != 200:
                    outcomes["failures"].append(f"HTTP {response.status_code}: {response.text}")
            if reply.status_code == 200 == health.status_code:
                outcomes["successes"] += 1
                outcomes["pids"].add(health.json()["pid"])
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # requests before the update too
        action()
        time.sleep(1)  # and after it
    finally:
        done.set()
        thread.join(120)
    return outcomes


def _same_process(described: dict[str, str]) -> bool:
    try:
        proc = psutil.Process(int(described["pid"]))
        alive = proc.status() != psutil.STATUS_ZOMBIE
        return alive and abs(proc.create_time() - float(described["pid_create_time"])) < 0.05
    except psutil.Error:
        return False


def test_killed_server_is_reported_dead_and_can_be_recreated(
    env: dict[str, str], state_dir: Path, tmp_path: Path
):
    create = ("create", "-t", "tfx", "--name", "chat", "-m", "models:/chat/1")
    cli(env, *create)
    pid = int(_get(env, "chat")["pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    assert "'status': 'dead'" in cli(env, "list", "-t", "tfx").stdout
    assert _get(env, "chat")["status"] == "dead"
    body = tmp_path / "body.json"
    body.write_text(json.dumps(CHAT_BODY))
    predict = cli(env, "predict", "-t", "tfx", "--name", "chat", "-I", str(body), check=False)
    assert predict.returncode != 0
    assert f"'chat' is not running (pid {pid} exited)" in predict.stderr

    again = cli(env, *create)  # over the dead record: its model copy is still there
    assert "Using cached model" in again.stderr and "Downloading" not in again.stderr
    assert _get(env, "chat")["status"] == "running"
    cli(env, "delete", "-t", "tfx", "--name", "chat")
    assert "[]" in cli(env, "list", "-t", "tfx").stdout
    assert [p for p in (state_dir / "models").iterdir()] == [], "nothing uses the copy any more"


def test_run_local_stops_cleanly_on_sigint(env: dict[str, str], state_dir: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "deployments", "run-local", "-t", "tfx"]
    cmd += ["--name", "local", "-m", "models:/chat/1", "-C", f"port={port}"]
    log = state_dir / "run-local.out"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        servers.wait_until_ready(
            f"http://127.0.0.1:{port}/health",
            timeout_s=300,
            exited=lambda: proc.poll() is not None,
            describe=lambda: servers.tail(log),
        )
        children = psutil.Process(proc.pid).children(recursive=True)
        reply = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT_BODY)
        assert reply.status_code == 200, reply.text
        assert not list(state_dir.glob("*.json")), "run-local records nothing"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()[-4000:]
        assert not any(child.is_running() for child in children)
    finally:
        for child in [*children, psutil.Process(proc.pid) if proc.poll() is None else None]:
            if child is not None and child.is_running():
                child.kill()
