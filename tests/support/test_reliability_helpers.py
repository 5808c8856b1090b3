"""The fault-injection proxy itself: an outage must look like a stopped server and keep its port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.reliability_helpers import FlakyProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A one-connection-at-a-time echo server on a loopback port (stands in for the proxied server)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"ping")
        return conn.recv(1024)


def test_an_outage_refuses_connections_and_keeps_the_port(echo_port: int) -> None:
    proxy = FlakyProxy(echo_port).up()
    try:
        assert _echo(proxy.port) == b"ping"
        proxy.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        # the port stays ours: a plain bind (as a broker's listener would do) is refused ...
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", proxy.port))
        # ... and the OS does not hand it out as a free port
        for _ in range(2000):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                assert probe.getsockname()[1] != proxy.port
        proxy.up()
        assert _echo(proxy.port) == b"ping"
    finally:
        proxy.close()
