"""The local end of ``wrenbox sandbox shell``: this terminal, in raw mode, joined to a PTY in a sandbox.

Keys go to the sandbox as they are typed (Ctrl-C included: it interrupts the sandbox's foreground
process, not this CLI); the sandbox's output is written as it arrives; a resize of this terminal
(SIGWINCH) resizes the sandbox's. When stdin is not a terminal it is sent as typed input and, at its end,
Ctrl-D, so ``echo 'ls; exit 3' | wrenbox sandbox shell ID`` works in scripts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

import anyio

from wrenbox.client import ServerClient
from wrenbox.envd import AsyncEnvdClient
from wrenbox.envd.models import Exited, PtyOutput, Stderr, Stdout

__all__ = ["run_shell"]

EOT = b"\x04"


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return size.columns, size.lines
    except OSError:
        return 80, 24


async def run_shell(api: ServerClient, sandbox: dict[str, Any], user: str | None) -> int:
    """The shell's exit code (128 + n when a signal ended it)."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    cols, rows = _size(stdout if os.isatty(stdout) else stdin)
    async with api.agent(sandbox) as envd, envd.processes.pty_start(cols, rows, user=user) as proc:
        with raw_mode(stdin) if interactive else contextlib.nullcontext():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_keys, envd, proc.pid, stdin, interactive)
                if interactive:
                    tg.start_soon(_resizes, envd, proc.pid, stdout)
                code = 1
                async for event in proc:
                    match event:
                        case PtyOutput(data) | Stdout(data) | Stderr(data):
                            await anyio.to_thread.run_sync(os.write, stdout, data)
                        case Exited(exit_code):
                            code = exit_code if exit_code >= 0 else 128 + signal.SIGKILL
                tg.cancel_scope.cancel()
    return code


async def _keys(envd: AsyncEnvdClient, pid: int, fd: int, interactive: bool) -> None:
    # Waiting on the loop, not in a thread: a thread blocked in read() would keep the process alive
    # after the shell has exited, until the next key press.
    while True:
        await anyio.wait_readable(fd)
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not data:
            if not interactive:
                await envd.processes.pty_input(pid, EOT)
            return
        await envd.processes.pty_input(pid, data)


async def _resizes(envd: AsyncEnvdClient, pid: int, fd: int) -> None:
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            cols, rows = _size(fd)
            await envd.processes.pty_resize(pid, cols, rows)
