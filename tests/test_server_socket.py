"""The listening socket of an updated deployment's new server (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket
import sys

import pytest

from mlflow_tfx_plugin.deployments.listener import listening_socket, steer_new_connections_to
from mlflow_tfx_plugin.deployments.process import free_port

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT steering is Linux")


def _accept_all(sock: socket.socket) -> int:
    sock.setblocking(False)
    accepted = 0
    while True:
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            return accepted
        connection.close()
        accepted += 1


def test_new_server_takes_every_new_connection_and_keeps_them_after_the_old_one_leaves():
    port = free_port()
    old = listening_socket("127.0.0.1", port)
    old.listen(64)
    new = listening_socket("127.0.0.1", port)
    new.listen(64)
    steer_new_connections_to(new)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        # Without steering the kernel spreads connections by hash: the old one gets ~half,
        # and those still queued when it closes are reset.
        assert (_accept_all(old), _accept_all(new)) == (0, 20)

        old.close()
        clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        assert _accept_all(new) == 5
    finally:
        for client in clients:
            client.close()
        new.close()
