"""The deployment server's process: its listening socket, uvicorn, and the port hand-over.

Run by the ``tfx`` target as ``python -m mlflow_tfx_plugin.deployments.listener --model-dir
DIR --name NAME --config-json '{...}'``; the API key, when there is one, comes from the
``MLFLOW_TFX_API_KEY`` environment variable, never from the command line.

On ``update`` the new server binds the same port with ``SO_REUSEPORT``, listens only once its
model is loaded, and then takes every new connection (:func:`steer_new_connections_to`).

uvicorn runs with limits (:func:`uvicorn_config`): request headers must arrive within
``HEADER_TIMEOUT_S`` and fit in ``MAX_HEADER_BYTES``, an idle keep-alive connection closes
after ``KEEP_ALIVE_S``; the app itself bounds the time a body takes.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlflow_tfx_plugin.deployments.config import API_KEY_ENV, DeploymentConfig
from mlflow_tfx_plugin.errors import InvalidInputError

if TYPE_CHECKING:
    from mlflow_tfx_plugin.deployments.server import ServerState

_logger = logging.getLogger("mlflow_tfx_plugin.server")

SHUTDOWN_DEADLINE_S = float(os.environ.get("MLFLOW_TFX_SHUTDOWN_TIMEOUT", "30"))
#: Seconds a server keeps accepting after SIGTERM, before its graceful shutdown.
DRAIN_S = 1.0
HEADER_TIMEOUT_S = float(os.environ.get("MLFLOW_TFX_HEADER_TIMEOUT", "10"))
KEEP_ALIVE_S = 5
MAX_HEADER_BYTES = 16 * 1024  # request line and headers: h11's default, made explicit
_SO_ATTACH_REUSEPORT_CBPF = 51  # Linux <asm-generic/socket.h>
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant k


def serve(
    name: str,
    model_dir: Path,
    config: DeploymentConfig,
    *,
    api_key: str | None = None,
    listen_after_load: bool = False,
) -> int:
    """Serve in the foreground until SIGINT/SIGTERM; returns the process exit code."""
    # The app (torch, transformers, the model) is imported here, not with the module: the
    # CLI process imports this module for listening_socket only.
    from mlflow_tfx_plugin.deployments.server import create_app

    if config.port is None:
        raise InvalidInputError("The server needs a port.", param="port")
    app = create_app(
        name, config, model_dir=model_dir, api_key=api_key, listen_after_load=listen_after_load
    )
    server = _Server(uvicorn_config(app, config), takes_over_port=listen_after_load)
    state: ServerState = app.state.tfx
    state.stop_server = lambda: setattr(server, "should_exit", True)
    _logger.info("Serving %s from %s on http://%s:%d", name, model_dir, config.host, config.port)
    server.run(sockets=[listening_socket(config.host, config.port)])
    # 1 when the model failed to load, or uvicorn never started (it logged why)
    return 1 if state.load_error or not server.started else 0


def uvicorn_config(app: Any, config: DeploymentConfig) -> uvicorn.Config:
    """uvicorn's settings for the deployment server, limits included."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port or 0,
        http=LimitedH11Protocol,  # also where httptools is installed, so the limits hold
        log_level="info",
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=int(SHUTDOWN_DEADLINE_S),
    )


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers and JSON protocol errors.

    uvicorn itself times only idle keep-alive connections: one that sends half its headers
    (slow loris), or nothing at all, would stay open forever.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request has begun, or not even that
            self._await_headers()
        else:
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        from pydantic_core import to_json

        from mlflow_tfx_plugin.deployments.server import APIError  # loaded with the app

        error = APIError(400, msg, kind="invalid_request_error")
        body = to_json(error.body())
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=error.status, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _await_headers(self) -> None:
        if self._header_deadline is None and not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            _logger.info(
                "Closing a connection whose request headers took over %g s", HEADER_TIMEOUT_S
            )
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server; when it replaces another one on the port, it takes all new connections.

    On SIGTERM it keeps accepting and serving for :data:`DRAIN_S` before uvicorn's graceful
    shutdown starts. By then a successor on the port takes every new connection, so the
    accept queue is empty when the socket closes (Linux resets what is left in it), and a
    connection accepted just before the signal has sent its request: uvicorn closes
    connections that have none in progress.
    """

    def __init__(self, config: uvicorn.Config, *, takes_over_port: bool) -> None:
        super().__init__(config)
        self.takes_over_port = takes_over_port
        self._exit_at: float | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._exit_at is None and not self.should_exit:
            _logger.info("Stopping in %.1f s: serving what is on its way first.", DRAIN_S)
            self._exit_at = time.monotonic() + DRAIN_S
            return
        super().handle_exit(sig, frame)  # a second signal: uvicorn's own (forced) exit

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.takes_over_port and self.started:
            for sock in sockets or ():
                steer_new_connections_to(sock)


def steer_new_connections_to(sock: socket.socket) -> None:
    """Make the kernel hand every new connection on the port to ``sock``, the newest listener.

    The old server of an update then gets nothing new while it drains, so no connection is
    left in its accept queue when it closes (Linux resets those). The one-instruction
    program returns index 1 of the port's SO_REUSEPORT group: the socket that joined second,
    this one. Once the old server has left, index 1 is out of range and the kernel falls
    back to its hash, so later updates work the same way.
    """
    return_one = struct.pack("@HBBI", _BPF_RET_K, 0, 0, 1)  # struct sock_filter
    program = ctypes.create_string_buffer(return_one)
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as err:  # not Linux, or an old kernel: connections are shared by hash
        _logger.warning("Could not take over new connections on the port: %s", err)


def listening_socket(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A socket bound with SO_REUSEPORT, so that an updated deployment's new server can
    listen on the same port while the old one drains: the URL never changes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--config-json", default="{}")
    parser.add_argument(
        "--listen-after-load",
        action="store_true",
        help="accept connections only once the model is ready (when sharing a port)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = DeploymentConfig(**json.loads(args.config_json))
    api_key = os.environ.get(API_KEY_ENV) or None
    return serve(
        args.name, args.model_dir, config, api_key=api_key, listen_after_load=args.listen_after_load
    )


if __name__ == "__main__":
    sys.exit(main())
