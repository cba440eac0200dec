"""The blocking facade: :class:`EnvdClient` mirrors :class:`AsyncEnvdClient` method for method.

There is one implementation of the protocol, the async one. Each ``EnvdClient`` runs it on an event
loop in its own thread (an anyio blocking portal) and each method hands its call to that loop and
waits; a call costs one thread hop more than the async client. Streams become ordinary context
managers and iterators, async iterables of upload chunks become plain iterables.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

import anyio.to_thread
import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from wrenbox.envd.client import AsyncEnvdClient
from wrenbox.envd.endpoint import EnvdConfig
from wrenbox.envd.files import AsyncFiles
from wrenbox.envd.models import ExecResult, ProcessEvent, WatchEvent, WriteInfo
from wrenbox.envd.processes import PTY_COMMAND, AsyncProcesses, Command, Target
from wrenbox.envd.streams import EventStream, ProcessStream

__all__ = ["EnvdClient", "Files", "Processes", "SyncEventStream", "SyncProcessStream"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
_END = object()


class _Bridge:
    """Something whose async twin lives in ``self._async`` and runs on ``self._portal``."""

    _portal: BlockingPortal
    _async: Any


def _blocking(method: Callable[Concatenate[Any, P], Awaitable[R]]) -> Callable[Concatenate[_Bridge, P], R]:
    """The blocking twin of an async method: same name, signature and docs."""
    name = method.__name__

    @functools.wraps(method)
    def call(self: _Bridge, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._portal.call(functools.partial(getattr(self._async, name), *args, **kwargs))

    return call


class _BlockingIterator(Iterator[T]):
    def __init__(self, portal: BlockingPortal, source: AsyncIterator[T]) -> None:
        self._portal = portal
        self._source = source

    def __next__(self) -> T:
        item = self._portal.call(anext, self._source, _END)
        if item is _END:
            raise StopIteration
        return item  # type: ignore[return-value]


class SyncEventStream(_BlockingIterator[T], Generic[T]):
    """A stream of the async client, as a context manager and iterator."""

    def __init__(self, portal: BlockingPortal, stream: EventStream[T]) -> None:
        super().__init__(portal, stream)
        self._stream = stream
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        self._stack.enter_context(self._portal.wrap_async_context_manager(self._stream))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return self._stack.__exit__(exc_type, exc, tb)


class SyncProcessStream(SyncEventStream[ProcessEvent]):
    _stream: ProcessStream

    @property
    def pid(self) -> int:
        return self._stream.pid

    def collect(self, output_cap: int) -> ExecResult:
        return self._portal.call(self._stream.collect, output_cap)


class Processes(_Bridge):
    """``client.processes``; see :class:`~wrenbox.envd.processes.AsyncProcesses`."""

    def __init__(self, portal: BlockingPortal, processes: AsyncProcesses) -> None:
        self._portal = portal
        self._async = processes

    exec = _blocking(AsyncProcesses.exec)
    start = _blocking(AsyncProcesses.start)
    list = _blocking(AsyncProcesses.list)
    send_stdin = _blocking(AsyncProcesses.send_stdin)
    close_stdin = _blocking(AsyncProcesses.close_stdin)
    kill = _blocking(AsyncProcesses.kill)
    pty_input = _blocking(AsyncProcesses.pty_input)
    pty_resize = _blocking(AsyncProcesses.pty_resize)

    @functools.wraps(AsyncProcesses.exec_stream)
    def exec_stream(
        self,
        cmd: Command,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        stdin: bool = False,
    ) -> SyncProcessStream:
        stream = self._async.exec_stream(cmd, envs=envs, cwd=cwd, user=user, tag=tag, stdin=stdin)
        return SyncProcessStream(self._portal, stream)

    @functools.wraps(AsyncProcesses.connect)
    def connect(self, target: Target) -> SyncProcessStream:
        return SyncProcessStream(self._portal, self._async.connect(target))

    @functools.wraps(AsyncProcesses.pty_start)
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
    ) -> SyncProcessStream:
        stream = self._async.pty_start(cols, rows, cmd=cmd, envs=envs, cwd=cwd, user=user, tag=tag)
        return SyncProcessStream(self._portal, stream)


class Files(_Bridge):
    """``client.files``; see :class:`~wrenbox.envd.files.AsyncFiles`."""

    def __init__(self, portal: BlockingPortal, files: AsyncFiles) -> None:
        self._portal = portal
        self._async = files

    download_to = _blocking(AsyncFiles.download_to)
    stat = _blocking(AsyncFiles.stat)
    exists = _blocking(AsyncFiles.exists)
    list_dir = _blocking(AsyncFiles.list_dir)
    make_dir = _blocking(AsyncFiles.make_dir)
    move = _blocking(AsyncFiles.move)
    remove = _blocking(AsyncFiles.remove)

    @functools.wraps(AsyncFiles.upload)
    def upload(
        self, path: str, data: bytes | Path | Iterable[bytes], *, user: str | None = None
    ) -> WriteInfo:
        source = data if isinstance(data, bytes | bytearray | memoryview | Path) else _pulled(data)
        return self._portal.call(functools.partial(self._async.upload, path, source, user=user))

    @contextmanager
    def download(self, path: str, *, user: str | None = None) -> Iterator[Iterator[bytes]]:
        """``with files.download(path) as chunks: for chunk in chunks: ...``"""
        with self._portal.wrap_async_context_manager(self._async.download(path, user=user)) as chunks:
            yield _BlockingIterator(self._portal, chunks)

    @functools.wraps(AsyncFiles.watch)
    def watch(
        self, path: str, *, recursive: bool = False, user: str | None = None
    ) -> SyncEventStream[WatchEvent]:
        return SyncEventStream(self._portal, self._async.watch(path, recursive=recursive, user=user))


async def _pulled(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A caller's iterable, advanced in a worker thread so a slow producer never blocks the loop."""
    iterator = iter(chunks)
    while (chunk := await anyio.to_thread.run_sync(next, iterator, None)) is not None:
        yield chunk


class EnvdClient(_Bridge):
    """Blocking client of one guest agent; close it (or use ``with``) to stop its loop thread."""

    def __init__(
        self, config: EnvdConfig | None = None, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        loop_thread = start_blocking_portal(name="wrenbox-envd")
        self._portal = loop_thread.__enter__()
        try:
            # Built on the loop thread: the connection pool belongs to that loop.
            self._async = self._portal.call(_new_client, config, transport)
        except BaseException:
            loop_thread.__exit__(None, None, None)
            raise
        # Runs on close(), when the client is collected, or at interpreter exit while threads still
        # run: a client nobody closed must neither leak its thread nor hang the exit.
        self._finalizer = weakref.finalize(self, _shutdown, loop_thread, self._portal, self._async)
        self.config = self._async.config
        self.processes = Processes(self._portal, self._async.processes)
        self.files = Files(self._portal, self._async.files)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    wait_healthy = _blocking(AsyncEnvdClient.wait_healthy)
    init = _blocking(AsyncEnvdClient.init)
    envs = _blocking(AsyncEnvdClient.envs)
    metrics = _blocking(AsyncEnvdClient.metrics)
    warm_up = _blocking(AsyncEnvdClient.warm_up)


async def _new_client(
    config: EnvdConfig | None, transport: httpx.AsyncBaseTransport | None
) -> AsyncEnvdClient:
    return AsyncEnvdClient(config, transport=transport)


def _shutdown(
    loop_thread: AbstractContextManager[BlockingPortal], portal: BlockingPortal, client: AsyncEnvdClient
) -> None:
    try:
        portal.call(client.aclose)
    finally:
        loop_thread.__exit__(None, None, None)
