"""Start a server for a test or a benchmark, wait until it answers, always stop it.

One place for the four servers the integration tests and benchmarks run:

- :func:`models_serve`: ``mlflow models serve`` (ready when ``/ping`` answers 200);
- :func:`mlflow_server`: ``mlflow server`` (``/health``);
- :func:`listener_process`: the ``tfx`` target's server process,
  ``python -m mlflow_tfx_plugin.deployments.listener`` (``/health``);
- :func:`uvicorn_in_thread`: an ASGI app (our server's) on uvicorn in a thread of this process;
- :func:`ray_head`: a local Ray head (``ray start --head``), stopped with all its processes.

:func:`server_process` runs any other command the same way (``transformers serve`` in the
benchmarks). Every server binds 127.0.0.1. A process server runs in its own session and is
stopped as a group: SIGTERM, then SIGKILL after ``stop_timeout_s``. A server that exits or
does not answer in time raises, with the tail of its log.

This module imports the standard library, ``requests`` and ``psutil`` only (``ray_head`` also
the plugin's process finder): ``benchmarks/_shared.py``
loads it by path, so it must not depend on pytest or on the test suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.3


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a log file, or ``(no log)``."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def wait_until_ready(
    url: str,
    *,
    timeout_s: float,
    exited: Callable[[], bool] = lambda: False,
    describe: Callable[[], str] = lambda: "",
    interval_s: float = POLL_INTERVAL_S,
) -> None:
    """Poll ``url`` until it answers 200.

    Args:
        url: the readiness URL (``.../health``, ``.../ping``).
        timeout_s: how long to wait.
        exited: whether the server is gone (then waiting is pointless).
        describe: what to add to the error (a log tail).
        interval_s: the pause between polls.

    Raises:
        RuntimeError: the server exited before it answered.
        TimeoutError: it did not answer 200 within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if exited():
            raise RuntimeError(f"the server exited before {url} answered:\n{describe()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(interval_s)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{describe()}")


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ServerProcess:
    """A running server process: its base URL, the process and its log file."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return tail(self.log, chars)


@contextlib.contextmanager
def server_process(
    cmd: Sequence[str],
    *,
    port: int,
    health_path: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 120,
    stop_timeout_s: float = 30,
) -> Iterator[ServerProcess]:
    """Run ``cmd`` (a server on ``port``) until the block ends.

    Yields once ``health_path`` answers 200. Output goes to ``log``; when the block raises,
    the log's tail is printed to stderr (pytest shows it with the failure).

    Raises:
        RuntimeError: the process exited before it was ready (with the log's tail).
        TimeoutError: it was not ready within ``startup_timeout_s``.
    """
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            list(cmd),
            env=dict(os.environ if env is None else env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its children (uvicorn, workers) stop with it
        )
    server = ServerProcess(f"http://{HOST}:{port}", proc, log)
    try:
        wait_until_ready(
            server.url + health_path,
            timeout_s=startup_timeout_s,
            exited=lambda: proc.poll() is not None,
            describe=server.log_tail,
        )
        try:
            yield server
        except Exception:
            print(f"{cmd[0]} {' '.join(cmd[1:4])} log tail:\n{server.log_tail()}", file=sys.stderr)
            raise
    finally:
        stop_process_group(proc, timeout_s=stop_timeout_s)


def stop_process_group(proc: subprocess.Popen[bytes], *, timeout_s: float = 30) -> None:
    """SIGTERM the session ``proc`` leads, SIGKILL it after ``timeout_s``; reap ``proc``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _with_bin_on_path(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's bin directory first on PATH.

    ``mlflow models serve`` execs a bare ``uvicorn``, found through PATH.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PATH": path}


@contextlib.contextmanager
def models_serve(
    model_uri: str | Path,
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    env_manager: str | None = "local",
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 120,
) -> Iterator[ServerProcess]:
    """``mlflow models serve -m MODEL_URI`` on a free port until the block ends.

    Args:
        model_uri: a saved model's path or any model URI MLflow resolves.
        log: where the server's output goes.
        env: the server's environment (default: this one, with ``HF_HUB_OFFLINE=1``).
        env_manager: ``--env-manager``; None for MLflow's default (virtualenv).
        extra_args: more CLI arguments (``-w 1``, ``-t 900``).
        startup_timeout_s: how long to wait for ``/ping``.
    """
    port = free_port()
    base = {**os.environ, "HF_HUB_OFFLINE": "1"} if env is None else env
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_uri)]
    if env_manager is not None:
        cmd += ["--env-manager", env_manager]
    cmd += ["--host", HOST, "--port", str(port), *extra_args]
    with server_process(
        cmd,
        port=port,
        health_path="/ping",
        log=log,
        env=_with_bin_on_path(base),
        startup_timeout_s=startup_timeout_s,
        stop_timeout_s=20,
    ) as server:
        yield server


@contextlib.contextmanager
def mlflow_server(
    *,
    backend_store_uri: str,
    artifacts_destination: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 120,
) -> Iterator[ServerProcess]:
    """``mlflow server`` (one worker, proxied artifacts) on a free port until the block ends."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port)]
    cmd += ["--backend-store-uri", backend_store_uri]
    cmd += ["--artifacts-destination", str(artifacts_destination), "--workers", "1"]
    with server_process(
        cmd,
        port=port,
        health_path="/health",
        log=log,
        env=env,
        startup_timeout_s=startup_timeout_s,
    ) as server:
        yield server


@contextlib.contextmanager
def listener_process(
    model_dir: Path,
    *,
    name: str,
    config: Mapping[str, Any],
    log: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 180,
) -> Iterator[ServerProcess]:
    """The ``tfx`` target's server process on a free port until the block ends.

    ``config`` holds ``-C`` keys (``max_batch_size``, ...); the port is chosen here.
    """
    port = free_port()
    config_json = json.dumps({"port": port, **config})
    cmd = [sys.executable, "-m", "mlflow_tfx_plugin.deployments.listener"]
    cmd += ["--model-dir", str(model_dir), "--name", name, "--config-json", config_json]
    with server_process(
        cmd,
        port=port,
        health_path="/health",
        log=log,
        env=env,
        startup_timeout_s=startup_timeout_s,
    ) as server:
        yield server


#: The API key of :func:`openai_listener` servers (a test value, never a real secret).
TEST_API_KEY = "test-key-not-a-secret"


@contextlib.contextmanager
def openai_listener(
    model_dir: Path, *, log: Path, config: Mapping[str, Any] | None = None
) -> Iterator[Any]:
    """:func:`listener_process` named ``tiny`` behind :data:`TEST_API_KEY`, offline;
    yields an ``openai.OpenAI`` client for it (no retries: a failure shows at once)."""
    import openai  # imported here: this module stays importable without it

    from mlflow_tfx_plugin.deployments.config import API_KEY_ENV
    from mlflow_tfx_plugin.deployments.process import server_environment

    env = {**server_environment(TEST_API_KEY, API_KEY_ENV), "HF_HUB_OFFLINE": "1"}
    with listener_process(
        model_dir, name="tiny", config=config or {"max_batch_size": 4}, log=log, env=env
    ) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key=TEST_API_KEY, max_retries=0)


# --------------------------------------------------------------------------- in this process


@contextlib.contextmanager
def uvicorn_in_thread(app: Any, *, port: int, startup_timeout_s: float = 120) -> Iterator[str]:
    """Serve the ASGI ``app`` on 127.0.0.1:``port`` from a daemon thread; yields its base URL.

    Cheaper than a server process. Ready when ``/health`` answers 200.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"
    try:
        wait_until_ready(
            f"{url}/health",
            timeout_s=startup_timeout_s,
            exited=lambda: not thread.is_alive(),
            describe=lambda: "the uvicorn thread ended",
        )
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def ray_head(tmp_root: Path, *, num_cpus: int = 2) -> Iterator[str]:
    """A Ray head this test starts on this machine (as a user would, without a token) and
    stops afterwards, all of its processes; yields its address (127.0.0.1:PORT).

    Its dashboard binds 127.0.0.1; Ray's internal ports listen on every interface (Ray
    offers no loopback-only mode), which only this sandbox can reach.
    """
    from mlflow_tfx_plugin.deployments.ray_cluster import LocalHead, head_processes

    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="tfxt-ray-", dir="/tmp"))  # short: unix sockets
    head = LocalHead(address=f"{HOST}:{port}", temp_dir=str(temp_dir), token_path="", started_at="")
    ray = Path(sys.executable).with_name("ray")
    command = [
        str(ray), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        yield head.address
    finally:
        processes = head_processes(head)
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(processes, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
