"""The official e2b SDK drives an interactive PTY through our agent."""

from __future__ import annotations

import time

from e2b import Sandbox
from e2b.sandbox.commands.command_handle import PtySize


def _read_until(handle, needle: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    for _stdout, _stderr, pty in handle:
        if pty:
            seen += pty
        if needle in seen or time.monotonic() > deadline:
            break
    return seen


def test_pty_create_input_resize_kill(sandbox: Sandbox) -> None:
    terminal = sandbox.pty.create(PtySize(cols=80, rows=24), envs={"PS1": "$ "})
    try:
        sandbox.pty.send_stdin(terminal.pid, b"tty; stty size; echo READY-$((40+2))\n")
        output = _read_until(terminal, b"READY-42")
        assert b"/dev/pts/" in output  # a real terminal is the controlling tty
        assert b"24 80" in output

        sandbox.pty.resize(terminal.pid, PtySize(cols=132, rows=50))
        sandbox.pty.send_stdin(terminal.pid, b"stty size; echo DONE-$((1+1))\n")
        assert b"50 132" in _read_until(terminal, b"DONE-2")
    finally:
        assert sandbox.pty.kill(terminal.pid) is True
    assert terminal.pid not in [p.pid for p in sandbox.commands.list()] or _gone_soon(sandbox, terminal.pid)


def _gone_soon(sandbox: Sandbox, pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if pid not in [p.pid for p in sandbox.commands.list()]:
            return True
        time.sleep(0.05)
    return False
