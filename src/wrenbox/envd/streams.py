"""Open streams from the agent: a process's events and a directory watch's changes.

Each stream is an async context manager (entering opens the HTTP stream and waits for the agent to
confirm; leaving closes it) and an async iterator of typed events. Closing a process stream only
detaches: the process keeps running in the guest and can be reattached by pid or tag.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
from protobuf import Oneof

from wrenbox.envd.connect import ServerStream, translate_errors
from wrenbox.envd.models import (
    ExecResult,
    Exited,
    ProcessEvent,
    PtyOutput,
    Started,
    Stderr,
    Stdout,
    WatchEvent,
)
from wrenbox.errors import Unavailable, WrenboxError

__all__ = ["EventStream", "ProcessStream", "WatchStream"]

T = TypeVar("T")
Opener = Callable[[], AbstractAsyncContextManager[ServerStream[Any]]]


class EventStream(Generic[T]):
    """Typed events decoded from one server stream; subclasses say how to decode and when it is over."""

    what = "stream"

    def __init__(self, opener: Opener, open_timeout: float | None) -> None:
        self._opener = opener
        self._open_timeout = open_timeout
        self._stack: AsyncExitStack | None = None
        self._stream: ServerStream[Any] | None = None
        self._pending: list[T] = []
        self._done = False
        self.opened_at = 0.0

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError(f"this {self.what} was already opened")
        self._stack = AsyncExitStack()
        self.opened_at = time.monotonic()
        try:
            with translate_errors(f"opening a {self.what}", self._open_timeout):
                self._stream = await self._stack.enter_async_context(self._opener())
                await self._confirm()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._stack is not None
        assert self._stream is not None
        try:
            if exc_type is None and self._done and not self._stream.ended:
                await self._read_to_end(self._stream)
        finally:
            self._done = True
            await self._stack.aclose()

    @staticmethod
    async def _read_to_end(stream: ServerStream[Any]) -> None:
        """After the last event the agent ends the stream at once; reading that end lets the
        connection be reused. Whatever goes wrong here no longer matters to the caller."""
        with anyio.move_on_after(1.0), contextlib.suppress(WrenboxError):
            while await stream.receive() is not None:
                pass

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._pending:
            return self._pending.pop(0)
        if self._stream is None:
            raise RuntimeError(f"enter the {self.what} (`async with`) before iterating it")
        while not self._done:
            message = await self._stream.receive()
            if message is None:
                self._done = True
                self._on_end()
                break
            event = self._decode(message)
            if event is not None:
                return event
        raise StopAsyncIteration

    async def _confirm(self) -> None:
        """Wait for the agent's first message, which says the stream is set up."""

    def _decode(self, message: Any) -> T | None:
        raise NotImplementedError

    def _on_end(self) -> None:
        """The agent ended the stream cleanly."""


class ProcessStream(EventStream[ProcessEvent]):
    """A started or reattached process: ``pid`` is known on entry; events end with :class:`Exited`."""

    what = "process stream"

    def __init__(self, opener: Opener, open_timeout: float | None) -> None:
        super().__init__(opener, open_timeout)
        self.pid = 0

    async def _confirm(self) -> None:
        assert self._stream is not None
        first = await self._stream.receive()
        event = self._decode(first) if first is not None else None
        if not isinstance(event, Started):
            raise Unavailable(f"the agent opened a process stream with {first!r} instead of a start event")
        self.pid = event.pid
        self._pending.append(event)

    def _decode(self, message: Any) -> ProcessEvent | None:
        match message.event.event if message.event is not None else None:
            case Oneof(field="data", value=data):
                return _decode_output(data.output)
            case Oneof(field="start", value=start):
                return Started(start.pid)
            case Oneof(field="end", value=end):
                self._done = True
                return Exited(end.exit_code, end.error or None)
            case _:  # keepalive, or something newer than us
                return None

    def _on_end(self) -> None:
        raise Unavailable(f"the stream of process {self.pid} ended before the process exited")

    async def collect(self, output_cap: int) -> ExecResult:
        """Read to the end; keep at most ``output_cap`` bytes of stdout (PTY output counts as
        stdout) and of stderr, reading and dropping the rest so the exit code still arrives."""
        stdout, stderr = bytearray(), bytearray()
        stdout_cut = stderr_cut = False
        async for event in self:
            match event:
                case Stdout(data) | PtyOutput(data):
                    stdout_cut |= _append_capped(stdout, data, output_cap)
                case Stderr(data):
                    stderr_cut |= _append_capped(stderr, data, output_cap)
                case Exited(exit_code, error):
                    return ExecResult(
                        pid=self.pid,
                        exit_code=exit_code,
                        stdout=bytes(stdout),
                        stderr=bytes(stderr),
                        duration=time.monotonic() - self.opened_at,
                        stdout_truncated=stdout_cut,
                        stderr_truncated=stderr_cut,
                        error=error,
                    )
        raise Unavailable(f"the stream of process {self.pid} ended before the process exited")


def _decode_output(output: Oneof | None) -> ProcessEvent | None:
    match output:
        case Oneof(field="stdout", value=data):
            return Stdout(data)
        case Oneof(field="stderr", value=data):
            return Stderr(data)
        case Oneof(field="pty", value=data):
            return PtyOutput(data)
    return None


def _append_capped(buffer: bytearray, data: bytes, cap: int) -> bool:
    """Append what fits under ``cap``; say whether anything was dropped."""
    room = cap - len(buffer)
    if room >= len(data):
        buffer += data
        return False
    if room > 0:
        buffer += data[:room]
    return True


class WatchStream(EventStream[WatchEvent]):
    """Changes under a directory, from the moment the stream was entered until it is left."""

    what = "directory watch"

    async def _confirm(self) -> None:
        assert self._stream is not None
        first = await self._stream.receive()
        match first.event if first is not None else None:
            case Oneof(field="start"):
                return
        raise Unavailable(f"the agent opened a watch with {first!r} instead of a start event")

    def _decode(self, message: Any) -> WatchEvent | None:
        match message.event:
            case Oneof(field="filesystem", value=event):
                return WatchEvent.from_pb(event)
        return None
