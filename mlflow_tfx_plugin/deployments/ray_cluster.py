"""The Ray cluster a ``backend=ray`` deployment runs on: connect to it, or start a local head.

:func:`connected` attaches this process to a cluster for one CLI command: ``-C ray_address``,
else ``$RAY_ADDRESS``, else the local head this plugin started earlier, else any running
local cluster, else (for ``create``) a new local head. A head we start is recorded in the
state directory (``ray/head.json``) with a token of its own (``ray/head.token``, mode 600):
Ray's internal ports listen on every interface whatever address it is given, so the head
runs with Ray's token authentication and nobody without the token can use it.
:func:`stop_head_if_unused` stops that head once no deployment is left on it; a cluster we
did not start is never stopped.

Ray is imported only here and in :mod:`.ray_backend` / :mod:`.ray_replica`, so the process
backend never loads it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from mlflow_tfx_plugin.deployments.process import free_port, say
from mlflow_tfx_plugin.deployments.state import DeploymentRecord, DeploymentStore, utc_now
from mlflow_tfx_plugin.errors import InvalidInputError, TfxError

RAY_EXTRA_HINT = 'pip install "mlflow-tfx-plugin[ray]"'
HEAD_RECORD = "ray/head.json"  # in a subdirectory: *.json beside it are deployment records
HEAD_TOKEN = "ray/head.token"
CONNECT_TIMEOUT_S = 5.0
HEAD_START_TIMEOUT_S = 120.0
HEAD_STOP_GRACE_S = 10.0


def import_ray() -> ModuleType:
    """``ray`` (with Serve), or a 400 that says how to install it."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as err:
        raise InvalidInputError(
            f"backend=ray needs Ray Serve, which is not installed ({err}): run `{RAY_EXTRA_HINT}`.",
            param="backend",
        ) from None
    return ray


@dataclass(frozen=True, kw_only=True)
class LocalHead:
    """A Ray head this plugin started: where it listens and what identifies its processes."""

    address: str  # 127.0.0.1:PORT
    temp_dir: str  # Ray's --temp-dir, unique to this head (its processes name it)
    token_path: str
    started_at: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def is_alive(self) -> bool:
        return _accepts_connections("127.0.0.1", self.port)


@dataclass(frozen=True, kw_only=True)
class Connection:
    """The cluster this process is attached to, and whether it is our own local head."""

    address: str
    head: LocalHead | None  # set when the cluster is the head this plugin started


# -- connecting -----------------------------------------------------------------------------


@contextmanager
def connected(
    store: DeploymentStore, address: str | None, *, may_start: bool = False
) -> Iterator[Connection]:
    """Attach to the cluster for a deployment (see the module docstring), then detach.

    Args:
        store: the state directory, which records a head this plugin started.
        address: ``-C ray_address`` or the address a deployment was recorded with.
        may_start: start a local head when no cluster is found (``create`` only).

    Raises:
        InvalidInputError: Ray is not installed, or ``address`` cannot be reached.
        TfxError: no cluster runs and ``may_start`` is false, or a head failed to start.
    """
    connection = _find_cluster(store, address, may_start=may_start)
    _use_head_token(connection.head)  # before Ray is imported: it reads the mode once
    ray = import_ray()
    try:
        ray.init(
            address=connection.address,
            log_to_driver=False,
            logging_level="WARNING",
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError) as err:
        raise _unreachable(connection.address, err) from None
    try:
        yield connection
    finally:
        ray.shutdown()


def _find_cluster(store: DeploymentStore, address: str | None, *, may_start: bool) -> Connection:
    head = read_head(store)
    explicit = address or os.environ.get("RAY_ADDRESS") or None
    if explicit:
        if head is not None and explicit == head.address:
            return Connection(address=head.address, head=head)
        _check_reachable(explicit)
        return Connection(address=explicit, head=None)
    if head is not None and head.is_alive():
        return Connection(address=head.address, head=head)
    running = _running_local_cluster()
    if running:
        return Connection(address=running, head=None)
    if not may_start:
        raise TfxError(
            "No Ray cluster is running here: pass -C ray_address=HOST:PORT or set $RAY_ADDRESS."
        )
    head = start_head(store)
    return Connection(address=head.address, head=head)


def _running_local_cluster() -> str | None:
    """The GCS address of the one Ray cluster running on this machine, if there is one.

    Found as Ray's ``address="auto"`` finds it: from the command lines of local raylets.
    """
    found = sorted({_gcs_address_of(proc) for proc in psutil.process_iter(["cmdline"])} - {""})
    if len(found) > 1:
        raise InvalidInputError(
            f"Several Ray clusters run on this machine ({', '.join(found)}): choose one with "
            "-C ray_address=HOST:PORT.",
            param="ray_address",
        )
    return found[0] if found else None


def _gcs_address_of(proc: psutil.Process) -> str:
    args: list[str] = proc.info.get("cmdline") or []
    if not args or not args[0].endswith("/raylet"):
        return ""
    return next((arg.split("=", 1)[1] for arg in args if arg.startswith("--gcs-address=")), "")


def _check_reachable(address: str) -> None:
    """Fail fast (instead of Ray's minute of retries) when nothing listens at ``address``."""
    if address in ("auto", "local"):
        return
    parsed = urllib.parse.urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise InvalidInputError(
            f"Invalid ray_address {address!r}: use HOST:PORT (the head's GCS port, 6379 by "
            "default) or ray://HOST:PORT.",
            param="ray_address",
        )
    if not _accepts_connections(host, port):
        raise _unreachable(address, f"nothing accepts connections at {host}:{port}")


def _unreachable(address: str, err: object) -> InvalidInputError:
    return InvalidInputError(
        f"Cannot reach the Ray cluster at {address!r} ({err}). Start it (`ray start --head`) "
        "or fix -C ray_address / $RAY_ADDRESS; with Ray's token authentication, set "
        "$RAY_AUTH_MODE=token and the cluster's token ($RAY_AUTH_TOKEN_PATH).",
        param="ray_address",
    )


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _use_head_token(head: LocalHead | None) -> None:
    """Our head requires its token; any other cluster gets this process's own settings."""
    if head is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = head.token_path


# -- the local head we start and stop -------------------------------------------------------


def read_head(store: DeploymentStore) -> LocalHead | None:
    path = store.root / HEAD_RECORD
    try:
        return LocalHead(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        raise TfxError(f"The Ray head record {path} is corrupt ({err}); remove it.") from err


def start_head(store: DeploymentStore) -> LocalHead:
    """Start a local Ray head (as ``ray start --head`` does) and record it.

    Its dashboard binds 127.0.0.1, usage stats are off, and it runs with a token of its own.
    """
    token_path = store.root / HEAD_TOKEN
    token_path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(token_path, secrets.token_hex(32))
    # Unix socket paths live under the temp dir and must stay short (about 100 bytes).
    temp_dir = Path(tempfile.gettempdir()) / f"tfx-ray-{secrets.token_hex(4)}"
    port = free_port()
    head = LocalHead(
        address=f"127.0.0.1:{port}",
        temp_dir=str(temp_dir),
        token_path=str(token_path),
        started_at=utc_now(),
    )
    say(f"No Ray cluster found: starting a local Ray head on port {port} (files: {temp_dir})...")
    _run_ray_start(head)
    _write_private(store.root / HEAD_RECORD, json.dumps(asdict(head), indent=2))
    say(f"Ray head running at {head.address}; it stops when its last deployment is deleted.")
    return head


def _run_ray_start(head: LocalHead) -> None:
    command = [
        *_ray_command(),
        "start",
        "--head",
        f"--port={head.port}",
        "--dashboard-host=127.0.0.1",
        # free ports for what Ray would put on fixed ones, so heads can run side by side
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={head.temp_dir}",
        "--disable-usage-stats",
    ]
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": head.token_path,
    }
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=HEAD_START_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        _stop_processes(head)
        raise TfxError(
            f"The local Ray head did not start within {HEAD_START_TIMEOUT_S:g} s."
        ) from None
    if done.returncode != 0:
        _stop_processes(head)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise TfxError(f"`ray start --head` failed (exit {done.returncode}):\n{tail}")


def _ray_command() -> list[str]:
    """The ``ray`` CLI of this interpreter's environment (workers must run the same Python)."""
    beside = Path(sys.executable).with_name("ray")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def stop_head_if_unused(store: DeploymentStore, connection: Connection, serve_apps: int) -> None:
    """Stop our head when no deployment of ours and no other Serve app is left on it."""
    head = connection.head
    if head is None:
        return
    if serve_apps or _deployments_on(store, head.address):
        return
    say(f"The last deployment on the local Ray head {head.address} is gone: stopping the head.")
    _stop_processes(head)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    (store.root / HEAD_RECORD).unlink(missing_ok=True)
    Path(head.token_path).unlink(missing_ok=True)


def _deployments_on(store: DeploymentStore, address: str) -> list[str]:
    return [
        entry.name
        for entry in store.records()
        if isinstance(entry, DeploymentRecord)
        and entry.backend == "ray"
        and entry.ray_address == address
    ]


def head_processes(head: LocalHead) -> list[psutil.Process]:
    """Every process of our head: those naming its temp dir or GCS port, and their children."""
    roots = [proc for proc in psutil.process_iter(["cmdline"]) if _belongs_to(proc, head)]
    found = {proc.pid: proc for proc in roots}
    for proc in roots:
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def _belongs_to(proc: psutil.Process, head: LocalHead) -> bool:
    args: list[str] = proc.info.get("cmdline") or []
    gcs_suffix = f":{head.port}"
    return any(
        head.temp_dir in arg
        or (arg.startswith(("--address=", "--gcs-address=")) and arg.endswith(gcs_suffix))
        for arg in args
    )


def _stop_processes(head: LocalHead) -> None:
    processes = head_processes(head)
    for proc in processes:
        _signal(proc, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(processes, timeout=HEAD_STOP_GRACE_S)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)


def _signal(proc: psutil.Process, sig: int) -> None:
    with suppress(psutil.Error):
        proc.send_signal(sig)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def wait_until(condition: Any, *, timeout: float, interval: float = 0.5) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
