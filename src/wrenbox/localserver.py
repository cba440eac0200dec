"""The ``wrenbox serve`` of one data dir on this machine: the one already running there, or one started for
the caller (on a free loopback port) and stopped by it.

A data dir has one wrenbox process at a time (its lock file holds the holder's PID, see
:mod:`wrenbox.service`). :func:`lock_holder` names that process; :func:`listening_url` finds the port it
serves on, read from ``/proc`` and confirmed by its ``/health``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from wrenbox.errors import Conflict, WrenboxError
from wrenbox.service import LOCK_FILE

__all__ = ["LocalServer", "listening_url", "lock_holder", "start_server"]

_READY = re.compile(r"wrenbox serving on (http://\S+)")
_INFO = re.compile(r"^ts=\S+ level=(debug|info) ")
_LISTEN = "0A"  # the state of a listening socket in /proc/net/tcp


class ServerFailed(WrenboxError):
    pass


@dataclass
class LocalServer:
    """A server on this machine: ``process`` is set when the caller started it (and must stop it)."""

    url: str
    pid: int
    process: subprocess.Popen[str] | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    reader: threading.Thread | None = None

    @property
    def ours(self) -> bool:
        return self.process is not None

    def stop(self, timeout: float = 300) -> int:
        """SIGTERM, as systemd sends it (the server pauses what still runs, then exits): its exit status.
        Only for a server the caller started."""
        if self.process is None:
            raise Conflict(f"the server (pid {self.pid}) was not started here; it is left running")
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        if self.reader is not None:
            self.reader.join(timeout=10)
        return code


def lock_holder(data_dir: Path) -> int | None:
    """The PID of the wrenbox process that holds ``data_dir`` (0 if it did not say), or None if free."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            # Shared, and let go at once: only an exclusive holder (a wrenbox process) refuses it.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def listening_url(pid: int) -> str | None:
    """``http://HOST:PORT`` of the wrenbox API process ``pid`` listens on (its ``/health`` answers), or
    None if it listens on none (it is not a server, or is gone)."""
    for host, port in _listening(pid):
        url = f"http://{host}:{port}"
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}:
                return url
    return None


def _listening(pid: int) -> list[tuple[str, int]]:
    """The TCP addresses process ``pid`` listens on (any address shown as the loopback)."""
    proc = Path(f"/proc/{pid}")
    try:
        links = [str(fd.readlink()) for fd in (proc / "fd").iterdir()]
        tables = [(family, (proc / "net" / name).read_text()) for family, name in _TABLES]
    except OSError:  # gone, or not ours to read
        return []
    inodes = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    found = []
    for family, table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[3] == _LISTEN and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((_host(family, address), int(port, 16)))
    return found


_TABLES = ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6"))


def _host(family: socket.AddressFamily, hex_address: str) -> str:
    """/proc/net/tcp's address (32-bit words in host order, little-endian here) as a URL's host."""
    raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
    text = socket.inet_ntop(family, raw)
    if family == socket.AF_INET:
        return "127.0.0.1" if text == "0.0.0.0" else text
    return "[::1]" if text == "::" else f"[{text}]"


def start_server(
    env: Mapping[str, str] | None = None, on_line: Callable[[str], None] | None = None
) -> LocalServer:
    """Start ``wrenbox serve`` on a free loopback port with ``env`` (the settings it reads; default: ours)
    and wait until it listens (on a fresh data dir it builds its templates first: minutes). Its log lines
    go to ``on_line`` (once it serves, warnings and errors only) and the last ones are kept."""
    command = "from wrenbox.cli import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", command, "serve", "--listen", "127.0.0.1:0"],
        env=dict(os.environ if env is None else env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    server = LocalServer(url="", pid=process.pid, process=process)
    server.reader = threading.Thread(target=_pump, args=(server, on_line), daemon=True)
    server.reader.start()
    assert process.stdout is not None
    ready = _READY.search(process.stdout.readline())
    if ready is None:
        code = process.wait()
        server.reader.join(timeout=10)
        tail = "\n".join(server.log)
        raise ServerFailed(f"wrenbox serve exited ({code}) before it listened:\n{tail}")
    server.url = ready.group(1)
    return server


def _pump(server: LocalServer, on_line: Callable[[str], None] | None) -> None:
    """Keep the server's log lines; pass on those of its start (its template builds, which take long on a
    fresh data dir) and, once it serves, its warnings and errors only."""
    assert server.process is not None
    assert server.process.stderr is not None
    for raw in server.process.stderr:
        line = raw.rstrip("\n")
        server.log.append(line)
        if on_line is not None and (not server.url or not _INFO.search(line)):
            on_line(line)
