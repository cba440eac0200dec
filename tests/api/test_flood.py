"""A guest that floods the server with output: the server's memory does not follow it.

The guest agent already holds back a command's output from a client that does not read (its own
back-pressure), but a hostile guest need not run our agent's rules: here a guest program answers any
request on a port with an endless body, written as fast as the guest can. Through the proxy one client
reads it and another never does; what the non-reader is not taking must wait in the guest or in bounded
socket buffers, never pile up in ``wrenbox serve``.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from .conftest import TEMPLATE, Server, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

MIB = 1 << 20
FLOOD_PORT = 8000
# Any request: a 200 with a body that never ends (no length: it ends when the connection does).
FLOODER = f"""
import socket, threading
chunk = b"x" * (1 << 20)
def serve(conn):
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nconnection: close\\r\\n\\r\\n")
        while True:
            conn.sendall(chunk)
srv = socket.create_server(("0.0.0.0", {FLOOD_PORT}))
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_flood_through_the_proxy_costs_the_server_bounded_memory(e2b_env: Server) -> None:
    assert e2b_env.process is not None
    pid = e2b_env.process.pid
    sb = Sandbox.create(TEMPLATE)
    sb.files.write("/tmp/flooder.py", FLOODER)
    sb.commands.run("python3 /tmp/flooder.py", background=True).disconnect()
    headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": str(FLOOD_PORT)}

    def listening() -> bool:
        with httpx.stream("GET", e2b_env.url + "/", headers=headers, timeout=30) as r:
            return r.status_code == 200

    wait_for(listening, timeout=60)
    before = rss(pid)

    # The non-reader: a request, then never a recv (its socket's receive buffer fills, then nothing).
    idle = socket.create_connection(("127.0.0.1", e2b_env.port))
    idle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    fields = {"Host": "127.0.0.1", "E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": str(FLOOD_PORT)}
    request = "GET / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    idle.sendall(request.encode())
    peak = before
    received = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.wait(0.1):
            peak = max(peak, rss(pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        with httpx.stream("GET", e2b_env.url + "/", headers=headers, timeout=30) as streamed:
            for chunk in streamed.iter_raw():
                received += len(chunk)
                if time.monotonic() > deadline:
                    break
        time.sleep(2)  # the non-reader alone for a while
        assert sb.commands.run("echo alive").stdout == "alive\n"  # the server and the sandbox still answer
    finally:
        stop.set()
        watcher.join()
        idle.close()
    grown = peak - before
    assert received > 8 * MIB, f"the reading client got only {received} bytes"
    # Had the server buffered for the non-reader what the guest sent it, it would have grown by about
    # what the reader received (the guest writes to both as fast as they take it).
    assert grown < min(32 * MIB, received // 2), (
        f"{received >> 20} MiB read, the server grew {grown >> 20} MiB"
    )
    sb.kill()
