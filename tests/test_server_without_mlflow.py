"""The deployment server process never imports MLflow, pandas or Ray.

``import mlflow`` costs the server about 1.8 s and 100 MB of memory (pandas, pyarrow),
for nothing it uses. The ``tfx`` target starts the server with
``process.server_environment``; this test runs the server's own modules in a child process
with exactly that environment and checks what got imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mlflow_tfx_plugin as tfx
from mlflow_tfx_plugin.deployments.config import API_KEY_ENV
from mlflow_tfx_plugin.deployments.process import server_environment
from mlflow_tfx_plugin.errors import SERVER_PROCESS_ENV

_SERVE_ONE_MODEL = """
import asyncio, json, sys
from pathlib import Path

from mlflow_tfx_plugin.deployments.config import DeploymentConfig
from mlflow_tfx_plugin.deployments.server import create_app
from mlflow_tfx_plugin.deployments.service import LoadOptions, load_served_model
from mlflow_tfx_plugin.errors import InvalidInputError, StandaloneError


async def main():
    options = LoadOptions.from_config(DeploymentConfig(max_batch_size=2))
    served = load_served_model("tiny", Path(sys.argv[1]), options)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    answer = await served.chat_completion(served.parse_chat(body))
    try:
        served.parse_chat({"messages": []})
    except InvalidInputError as err:
        error = err
    rows = await served.predict([body, body])  # /invocations records
    served.close()
    return answer, error, rows


answer, error, rows = asyncio.run(main())
create_app  # imported for what it imports
heavy = ("mlflow", "pandas", "pyarrow", "ray")
print(json.dumps({
    "loaded": sorted(name for name in heavy if name in sys.modules),
    "answer": answer.choices[0].message.content,
    "rows": len(rows) if isinstance(rows, list) else 1,
    "error_root": isinstance(error, StandaloneError),
    "error_code": error.error_code,
}))
"""


@pytest.fixture(scope="module")
def chat_model(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "model"
    tfx.save_model(tiny_llama_dir, path, task="llm/v1/chat")
    return path


def test_server_process_runs_without_mlflow_or_pandas(chat_model: Path):
    env = server_environment(None, API_KEY_ENV)
    assert env[SERVER_PROCESS_ENV] == "1"

    result = subprocess.run(
        [sys.executable, "-c", _SERVE_ONE_MODEL, str(chat_model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert isinstance(report["answer"], str) and report["rows"] == 2
    # The same error classes, rooted in StandaloneError, with MLflow's error code names.
    assert report["error_root"] is True
    assert report["error_code"] == "INVALID_PARAMETER_VALUE"


def test_server_environment_limits_malloc_heaps_unless_set(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert server_environment(None, API_KEY_ENV)["MALLOC_ARENA_MAX"] == "2"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert server_environment(None, API_KEY_ENV)["MALLOC_ARENA_MAX"] == "8"


def test_errors_are_mlflow_exceptions_everywhere_else():
    from mlflow.exceptions import MlflowException

    from mlflow_tfx_plugin.errors import InvalidInputError, ModelNotFoundError, TfxError

    error = InvalidInputError("bad", param="x")
    assert isinstance(error, MlflowException) and isinstance(error, ValueError)
    assert error.error_code == "INVALID_PARAMETER_VALUE" and error.get_http_status_code() == 400
    assert ModelNotFoundError("gone").get_http_status_code() == 404
    assert TfxError("busy", error_code="TEMPORARILY_UNAVAILABLE").error_code == (
        "TEMPORARILY_UNAVAILABLE"
    )
