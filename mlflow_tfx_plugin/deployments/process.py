"""Server processes: command line, free ports, start detached, wait for /health, stop.

A process is identified by its pid *and* its start time, so a pid reused by another
program after the server died is not mistaken for the server.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

from mlflow_tfx_plugin.deployments.listener import listening_socket
from mlflow_tfx_plugin.errors import SERVER_PROCESS_ENV, InvalidInputError, TfxError

STARTUP_TIMEOUT_ENV = "MLFLOW_TFX_STARTUP_TIMEOUT"
"""Seconds to wait for a new server's ``/health`` (default 600)."""

DEFAULT_STARTUP_TIMEOUT = 600.0
STOP_GRACE_SECONDS = 30.0
LOG_TAIL_LINES = 40
SERVER_MODULE = "mlflow_tfx_plugin.deployments.listener"
HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ServerProcess:
    """A started server: its pid, its start time (psutil's ``create_time``) and its log."""

    pid: int
    create_time: float
    log_path: Path


def say(message: str) -> None:
    """A short progress line on stderr (stdout belongs to the MLflow CLI's output)."""
    print(f"[tfx] {message}", file=sys.stderr, flush=True)


def startup_timeout() -> float:
    raw = os.environ.get(STARTUP_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_STARTUP_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise TfxError(f"${STARTUP_TIMEOUT_ENV} must be a positive number of seconds, not {raw!r}.")
    return value


def server_command(
    model_dir: str | Path,
    name: str,
    arguments: Mapping[str, Any],
    *,
    listen_after_load: bool = False,
) -> list[str]:
    """The server's command line; ``arguments`` is ``config.server_arguments()`` (no key).

    ``listen_after_load`` is for a server sharing its port with the one it replaces: it
    must not take connections (and answer 503) while it loads.
    """
    command = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--model-dir",
        str(model_dir),
        "--name",
        name,
        "--config-json",
        json.dumps(dict(arguments)),
    ]
    return [*command, "--listen-after-load"] if listen_after_load else command


def server_environment(api_key: str | None, api_key_env: str) -> dict[str, str]:
    """This process's environment with the API key set (or removed) for the server, which
    runs without importing MLflow (``SERVER_PROCESS_ENV``)."""
    env = dict(os.environ)
    env.pop(api_key_env, None)
    if api_key:
        env[api_key_env] = api_key
    env.setdefault("PYTHONUNBUFFERED", "1")
    # glibc gives each thread that allocates its own heap, and the server's model threads
    # (the batch loop, lone requests, micro-batches) each keep freed activations in theirs.
    # Two heaps: 50 MB less peak RSS on a gpt2-small-sized model for about 2% of tokens/s.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env[SERVER_PROCESS_ENV] = "1"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int, *, shared: bool = False) -> None:
    """Raise a clear error if ``port`` at ``host`` cannot be bound now.

    Args:
        host: the interface the server binds.
        port: the port it binds.
        shared: bind as the server does, with ``SO_REUSEPORT``: a port where a server of
            ours listens (one that set ``SO_REUSEPORT`` too) counts as free.

    Raises:
        InvalidInputError: the port is taken (or the address is not local).
    """
    try:
        # Bound as the server binds (SO_REUSEADDR, as uvicorn does: a port whose old
        # connections linger in TIME_WAIT is free; one that something listens on is not).
        listening_socket(host, port, reuse_port=shared).close()
    except OSError as err:
        if shared:
            raise InvalidInputError(
                f"Cannot listen on {host}:{port} beside the running server ({err.strerror}); "
                "a server started by an older version of the plugin does not share its "
                "port. Pass -C port=... to move to another port, or delete and create "
                "the deployment again.",
                param="port",
            ) from err
        raise InvalidInputError(
            f"Cannot listen on {host}:{port} ({err.strerror}). Choose another -C port=..., "
            "or leave port out to get a free one.",
            param="port",
        ) from err


def client_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def start_detached(command: list[str], env: Mapping[str, str], log_path: Path) -> ServerProcess:
    """Start ``command`` in a new session, stdin from /dev/null, stdout+stderr to ``log_path``.

    The process outlives the caller (the ``mlflow deployments`` CLI).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    return ServerProcess(proc.pid, _create_time(proc.pid) or time.time(), log_path)


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _process(pid: int, create_time: float) -> psutil.Process | None:
    """The live (non-zombie) process ``pid`` if it was started at ``create_time``."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.05:
            return None  # the pid now belongs to another program
        if proc.status() == psutil.STATUS_ZOMBIE:
            _reap(pid)
            return None
        return proc
    except psutil.Error:
        return None


def _reap(pid: int) -> None:
    """Collect the exit status of our own dead child so it does not stay a zombie."""
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int | None, create_time: float | None) -> bool:
    """Whether the process ``pid`` started at ``create_time`` is still alive."""
    if not pid or create_time is None:
        return False
    return _process(pid, create_time) is not None


def server_start_time(pid: int, name: str) -> float | None:
    """When ``pid`` started, if it is a server of deployment ``name`` (for a damaged record
    that lost the start time); else None, so that no other program is ever stopped."""
    try:
        proc = psutil.Process(pid)
        command = proc.cmdline()
    except psutil.Error:
        return None
    ours = "--model-dir" in command  # the shape of server_command()
    named = any(flag == "--name" and value == name for flag, value in itertools.pairwise(command))
    return proc.create_time() if ours and named else None


def stop(pid: int, create_time: float, *, grace: float = STOP_GRACE_SECONDS) -> bool:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL its process group.

    Returns:
        ``True`` if the process exited on SIGTERM (or was already gone), ``False`` if killed.
    """
    proc = _process(pid, create_time)
    if proc is None:
        return True
    try:
        proc.terminate()
        proc.wait(timeout=grace)
        return True
    except psutil.TimeoutExpired:
        say(f"Server pid {pid} did not stop within {grace:.0f} s; killing it.")
    except psutil.Error:
        return True
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    with suppress(psutil.Error):
        proc.wait(timeout=10)
    return False


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a server log (empty if there is none)."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


def wait_until_healthy(server: ServerProcess, url: str, *, timeout: float) -> None:
    """Poll ``url/health`` until ``server`` answers 200; kill it if it dies or times out.

    The answer must carry ``server``'s pid: during an update the old server listens on
    the same port and answers too.

    Raises:
        TfxError: the server exited or was not ready within ``timeout`` seconds; the
            message holds the tail of its log.
    """
    say(f"Waiting for {url}/health (up to {timeout:.0f} s)...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(server.pid, server.create_time):
            raise _startup_error(server, "exited before it was ready")
        if _health_ok(url, server.pid):
            return
        time.sleep(0.25)
    stop(server.pid, server.create_time, grace=5)
    raise _startup_error(
        server,
        f"was not ready within {timeout:.0f} s (set ${STARTUP_TIMEOUT_ENV} to wait longer)",
    )


def health_status(url: str) -> str:
    """A live server's status for ``list``/``get``: "running" when ``/health`` says it can
    serve, else "loading", "failed" (its generation loop stopped: see the log) or
    "unreachable"."""
    try:
        response = requests.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S)
        body = response.json()
    except (requests.RequestException, ValueError):
        return "unreachable"
    if response.status_code == 200:
        return "running"
    status = body.get("status") if isinstance(body, dict) else None
    return status if status in ("loading", "failed") else "failed"


def _health_ok(url: str, pid: int) -> bool:
    """Whether ``url/health`` answers 200 from the process ``pid`` (the body names it)."""
    try:
        response = requests.get(f"{url}/health", timeout=2)
        body = response.json() if response.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return False
    return isinstance(body, dict) and body.get("pid") == pid


def _startup_error(server: ServerProcess, what: str) -> TfxError:
    tail = log_tail(server.log_path)
    return TfxError(
        f"The server (pid {server.pid}) {what}. Log: {server.log_path}\n"
        f"--- last {LOG_TAIL_LINES} lines of the log ---\n{tail}"
    )


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the block, so cleanup code runs.

    Without it a SIGTERM to the CLI while it waits for a server's /health would leave
    that server running with no record. Only the main thread can install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_foreground(command: list[str], env: Mapping[str, str], url: str) -> int:
    """Run the server attached to this terminal until it exits or we are told to stop.

    SIGINT (Ctrl-C) and SIGTERM to this process become one SIGTERM to the server (in its
    own session, so a terminal's Ctrl-C reaches it only through us), which shuts down
    gracefully; after :data:`STOP_GRACE_SECONDS` it is killed.

    Returns:
        0 if the server stopped because we asked it to, else its exit code.
    """
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True
    )
    stop_requested: list[float] = []

    def forward(signum: int, frame: Any) -> None:
        if not stop_requested:
            say(f"Got signal {signum}; stopping the server...")
            stop_requested.append(time.monotonic())
            proc.send_signal(signal.SIGTERM)

    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in handled} if in_main else {}
    try:
        ready = False
        while proc.poll() is None:
            if not ready and not stop_requested and _health_ok(url, proc.pid):
                ready = True
                say(f"Ready at {url}")
            if stop_requested and time.monotonic() - stop_requested[0] > STOP_GRACE_SECONDS:
                say(f"The server did not stop within {STOP_GRACE_SECONDS:.0f} s; killing it.")
                proc.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception escaped the loop
            proc.kill()
            proc.wait()
    code = proc.returncode
    if stop_requested and code in (0, -signal.SIGTERM, -signal.SIGKILL):
        return 0
    return code
