"""Processes in the guest: run and collect, stream, background, reattach, stdin, signals, PTY."""

from __future__ import annotations

import contextlib
import signal as signals
from collections.abc import Mapping, Sequence
from typing import Any, Final

import anyio
from protobuf import Message, Oneof

from wrenbox.envd.channel import Channel
from wrenbox.envd.connect import Rpc
from wrenbox.envd.models import ExecResult, ProcessInfo
from wrenbox.envd.streams import ProcessStream
from wrenbox.errors import InvalidArgument, NotFound, Timeout, Unavailable
from wrenbox.proto.process import process_pb as pr

__all__ = ["DEFAULT", "PTY_COMMAND", "SHELL", "AsyncProcesses", "Command", "Target"]


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
"""Stands for "the value in the client's config" where ``None`` already means "no limit"."""

Command = str | Sequence[str]
"""A string is a shell command line (run by :data:`SHELL`); a sequence is an argv, run as is."""
Target = int | str
"""Which process: an ``int`` is a pid, a ``str`` a tag."""

SHELL: Final = ("/bin/sh", "-c")
PTY_COMMAND: Final = ("/bin/bash", "-i", "-l")
PTY_ENVS: Final = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

_SIGNALS = {signals.SIGTERM: pr.Signal.SIGTERM, signals.SIGKILL: pr.Signal.SIGKILL}

_LIST = Rpc("/process.Process/List", pr.ListResponse)
_START = Rpc("/process.Process/Start", pr.StartResponse)
_CONNECT = Rpc("/process.Process/Connect", pr.ConnectResponse)
_UPDATE = Rpc("/process.Process/Update", pr.UpdateResponse)
_SEND_INPUT = Rpc("/process.Process/SendInput", pr.SendInputResponse)
_SEND_SIGNAL = Rpc("/process.Process/SendSignal", pr.SendSignalResponse)
_CLOSE_STDIN = Rpc("/process.Process/CloseStdin", pr.CloseStdinResponse)


class AsyncProcesses:
    """``client.processes``: everything about processes in the guest."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def exec(
        self,
        cmd: Command,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float | _Default | None = DEFAULT,
        output_cap: int | None = None,
    ) -> ExecResult:
        """Run a command to completion and collect its output (at most ``output_cap`` bytes of each
        stream, default from the config). ``stdin``, when given, is fed and then closed.

        A non-zero exit is a result, not an error. At ``timeout`` (default from the config) the
        process is killed and :class:`Timeout` raised. It is killed too when the call fails or is
        cancelled after the start: nobody could reach a foreground command left behind.
        """
        config = self._channel.config
        limit = config.exec_timeout if isinstance(timeout, _Default) else timeout
        cap = config.output_cap if output_cap is None else output_cap
        if cap < 0:
            raise InvalidArgument(f"output_cap must be >= 0, got {cap}")
        stream = self.exec_stream(cmd, envs=envs, cwd=cwd, user=user, stdin=stdin is not None)
        try:
            with anyio.fail_after(limit):
                async with stream:
                    if stdin is not None:
                        await self._feed(stream.pid, stdin)
                    return await stream.collect(cap)
        except TimeoutError:
            await self._abandon(stream.pid)
            raise Timeout(f"command did not finish within {limit:g} s; process {stream.pid} killed") from None
        except BaseException:
            await self._abandon(stream.pid)
            raise

    def exec_stream(
        self,
        cmd: Command,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        stdin: bool = False,
    ) -> ProcessStream:
        """Start a command and follow it: ``async with processes.exec_stream(...) as proc`` gives
        ``proc.pid``, ``async for event in proc`` its events. Leaving the block (or being
        cancelled) only detaches; the process keeps running. ``stdin=True`` keeps its stdin open
        for :meth:`send_stdin`."""
        request = pr.StartRequest(process=_process_config(cmd, envs, cwd), tag=tag, stdin=stdin)
        return self._stream(_START, request, user)

    async def start(
        self,
        cmd: Command,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        stdin: bool = False,
    ) -> int:
        """Start a command in the background and return its pid; reattach with :meth:`connect`."""
        async with self.exec_stream(cmd, envs=envs, cwd=cwd, user=user, tag=tag, stdin=stdin) as proc:
            return proc.pid

    def connect(self, target: Target) -> ProcessStream:
        """Reattach to a running process by pid or tag; the agent replays its recent output first."""
        return self._stream(_CONNECT, pr.ConnectRequest(process=_selector(target)), None)

    async def list(self) -> list[ProcessInfo]:
        """The processes the agent started that are still running."""
        response = await self._channel.unary(_LIST, pr.ListRequest())
        return [ProcessInfo.from_pb(info) for info in response.processes]

    async def send_stdin(self, target: Target, data: bytes) -> None:
        """Write to the stdin of a process started with ``stdin=True``."""
        await self._send_input(target, Oneof("stdin", bytes(data)))

    async def close_stdin(self, target: Target) -> None:
        """Close a process's stdin (EOF). For a PTY, send ``b"\\x04"`` with :meth:`pty_input`."""
        await self._channel.unary(_CLOSE_STDIN, pr.CloseStdinRequest(process=_selector(target)))

    async def kill(self, target: Target, signal: signals.Signals = signals.SIGKILL) -> None:
        """Send SIGKILL (default) or SIGTERM; :class:`NotFound` if no such process runs."""
        if signal not in _SIGNALS:
            raise InvalidArgument(f"the agent delivers SIGTERM and SIGKILL only, not {signal!r}")
        request = pr.SendSignalRequest(process=_selector(target), signal=_SIGNALS[signal])
        await self._channel.unary(_SEND_SIGNAL, request)

    def pty_start(
        self,
        cols: int,
        rows: int,
        *,
        cmd: Command = PTY_COMMAND,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
    ) -> ProcessStream:
        """Start a command (default: an interactive login bash) on a ``cols`` x ``rows`` terminal.
        Its output arrives as :class:`~wrenbox.envd.models.PtyOutput` events."""
        request = pr.StartRequest(
            process=_process_config(cmd, {**PTY_ENVS, **(envs or {})}, cwd),
            pty=pr.PTY(size=_pty_size(cols, rows)),
            tag=tag,
        )
        return self._stream(_START, request, user)

    async def pty_input(self, target: Target, data: bytes) -> None:
        await self._send_input(target, Oneof("pty", bytes(data)))

    async def pty_resize(self, target: Target, cols: int, rows: int) -> None:
        request = pr.UpdateRequest(process=_selector(target), pty=pr.PTY(size=_pty_size(cols, rows)))
        await self._channel.unary(_UPDATE, request)

    def _stream(self, rpc: Rpc[Any, Any], request: Message, user: str | None) -> ProcessStream:
        opener = self._channel.stream_opener(rpc, request, user)
        return ProcessStream(opener, self._channel.config.request_timeout)

    async def _send_input(self, target: Target, data: Oneof) -> None:
        request = pr.SendInputRequest(process=_selector(target), input=pr.ProcessInput(input=data))
        await self._channel.unary(_SEND_INPUT, request)

    async def _feed(self, pid: int, data: bytes) -> None:
        """All of ``data``, then EOF — unless the command exits first and wants none of it."""
        with contextlib.suppress(NotFound):
            if data:
                await self.send_stdin(pid, data)
            await self.close_stdin(pid)

    async def _abandon(self, pid: int) -> None:
        """Kill a process whose caller is gone, even from a cancelled task; never raise."""
        if not pid:
            return
        with (
            anyio.move_on_after(self._channel.config.request_timeout, shield=True),
            contextlib.suppress(NotFound, Unavailable, Timeout),  # gone already, or the agent is
        ):
            await self.kill(pid)


def _process_config(cmd: Command, envs: Mapping[str, str] | None, cwd: str | None) -> pr.ProcessConfig:
    if isinstance(cmd, str):
        if not cmd.strip():
            raise InvalidArgument("empty command")
        argv = [*SHELL, cmd]
    else:
        argv = list(cmd)
        if not argv or not all(isinstance(arg, str) for arg in argv) or not argv[0]:
            raise InvalidArgument(f"a command is a non-empty list of strings, got {cmd!r}")
    return pr.ProcessConfig(cmd=argv[0], args=argv[1:], envs=dict(envs or {}), cwd=cwd)


def _selector(target: Target) -> pr.ProcessSelector:
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise InvalidArgument(f"a process is named by pid (int) or tag (str), got {target!r}")
    if isinstance(target, int):
        if target <= 0:
            raise InvalidArgument(f"invalid pid {target}")
        return pr.ProcessSelector(selector=Oneof("pid", target))
    if not target:
        raise InvalidArgument("empty process tag")
    return pr.ProcessSelector(selector=Oneof("tag", target))


def _pty_size(cols: int, rows: int) -> pr.PTY.Size:
    if not (0 < cols <= 0xFFFF and 0 < rows <= 0xFFFF):
        raise InvalidArgument(f"terminal size must be 1..65535 columns and rows, got {cols}x{rows}")
    return pr.PTY.Size(cols=cols, rows=rows)
