"""Slow clients against ``wrenbox serve``'s port: many sockets dribbling request heads, sending nothing,
or stalling in a request body. A normal client is served meanwhile, and the server closes every
connection whose head does not complete in time (``api.head_timeout_s``, 3 s for the test server)."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from .conftest import Server

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def _connect(server: Server) -> socket.socket:
    # The timeout is the test's bound: a connection the server never ends fails with TimeoutError.
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_slow_clients_do_not_stop_others_and_are_cut_off(server: Server) -> None:
    dribblers = [_connect(server) for _ in range(40)]
    silent = [_connect(server) for _ in range(10)]
    stalled_bodies = []
    for _ in range(10):
        sock = _connect(server)
        head = f"POST /sandboxes HTTP/1.1\r\nhost: x\r\nx-api-key: {server.key()}\r\n"
        sock.sendall(f"{head}content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{".encode())
        stalled_bodies.append(sock)
    stop = threading.Event()

    def dribble() -> None:
        for byte in b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 500:
            for sock in dribblers:
                with contextlib.suppress(OSError):
                    sock.send(bytes([byte]))
            if stop.wait(0.1):
                return

    feeder = threading.Thread(target=dribble)
    feeder.start()
    try:
        with server.http() as http:
            for _ in range(5):
                assert http.get("/health").status_code == 200
                assert http.get("/v2/sandboxes").status_code == 200
        for sock in dribblers + silent:  # closed without an answer: their heads never completed
            assert _until_closed(sock) == b""
    finally:
        stop.set()
        feeder.join()
        for sock in dribblers + silent + stalled_bodies:
            sock.close()
    with server.http() as http:
        assert http.get("/health").status_code == 200
