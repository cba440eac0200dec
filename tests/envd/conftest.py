"""A real guest agent on a free loopback port, and the envd client in both flavours.

``envd`` is parametrized: ``async`` is an :class:`AsyncEnvdClient`; ``sync`` is an
:class:`EnvdClient` driven from a worker thread (as a blocking caller would) behind a small adapter
that makes its calls awaitable, so one test body checks both flavours.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import pytest

from wrenbox.envd import AsyncEnvdClient, EnvdClient, EnvdConfig

_ADDRESS = re.compile(rb"(\d+\.\d+\.\d+\.\d+):(\d+)")
_END = object()


@dataclass(frozen=True)
class Agent:
    url: str
    process: subprocess.Popen[bytes]


def start_agent() -> Agent:
    """``python -m wrenbox.guest --listen 127.0.0.1:0``; the agent prints the address it bound."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wrenbox.guest", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    for _ in range(20):
        line = process.stdout.readline()
        if not line:
            break
        if match := _ADDRESS.search(line):
            return Agent(f"http://{match[1].decode()}:{int(match[2])}", process)
    stop_agent(Agent("", process))
    raise RuntimeError(f"the agent exited ({process.returncode}) without printing its address")


def stop_agent(agent: Agent) -> None:
    agent.process.terminate()
    try:
        agent.process.wait(10)
    except subprocess.TimeoutExpired:
        agent.process.kill()
        agent.process.wait()
    if agent.process.stdout:
        agent.process.stdout.close()


@pytest.fixture(scope="session")
def agent() -> Iterator[Agent]:
    """One agent shared by the tests that do not change its access token."""
    started = start_agent()
    yield started
    stop_agent(started)


@pytest.fixture
def fresh_agent() -> Iterator[Agent]:
    started = start_agent()
    yield started
    stop_agent(started)


class Blocking:
    """Makes the calls of a blocking object awaitable by running them in a worker thread."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name in ("processes", "files"):
            return Blocking(attr)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: _BlockingCall(lambda: attr(*args, **kwargs))


class _BlockingCall:
    """Awaited: the call's result. Used with ``async with``: the context manager it returns."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._cm: Any = None

    def __await__(self) -> Any:
        return anyio.to_thread.run_sync(self._call).__await__()

    async def __aenter__(self) -> _BlockingIterator:
        self._cm = await anyio.to_thread.run_sync(self._call)
        return _BlockingIterator(await anyio.to_thread.run_sync(self._cm.__enter__))

    async def __aexit__(self, *exc: Any) -> Any:
        return await anyio.to_thread.run_sync(self._cm.__exit__, *exc)


class _BlockingIterator:
    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if callable(attr):
            return lambda *args: anyio.to_thread.run_sync(attr, *args)
        return attr

    def __aiter__(self) -> _BlockingIterator:
        return self

    async def __anext__(self) -> Any:
        item = await anyio.to_thread.run_sync(next, self._target, _END)
        if item is _END:
            raise StopAsyncIteration
        return item


@dataclass
class Flavour:
    name: str
    make: Callable[[EnvdConfig], Any]

    @property
    def is_sync(self) -> bool:
        return self.name == "sync"


@pytest.fixture(params=["async", "sync"])
def flavour(request: pytest.FixtureRequest) -> Flavour:
    if request.param == "async":
        return Flavour("async", AsyncEnvdClient)
    return Flavour("sync", lambda config: Blocking(EnvdClient(config)))


@pytest.fixture
async def connect(flavour: Flavour) -> AsyncIterator[Callable[..., Any]]:
    """``connect(url, **config)`` → a client of the parametrized flavour, closed after the test."""
    made: list[Any] = []

    def make(url: str, **config: Any) -> Any:
        client = flavour.make(EnvdConfig(base_url=url, **config))
        made.append(client)
        return client

    yield make
    for client in made:
        if isinstance(client, Blocking):
            await anyio.to_thread.run_sync(client._target.close)
        else:
            await client.aclose()


@pytest.fixture
async def envd(agent: Agent, connect: Callable[..., Any]) -> Any:
    client = connect(agent.url)
    await client.wait_healthy(timeout=30)
    return client


@pytest.fixture
async def async_envd(agent: Agent) -> AsyncIterator[AsyncEnvdClient]:
    """The async client alone, for what only exists in async code (cancellation)."""
    async with AsyncEnvdClient(EnvdConfig(base_url=agent.url)) as client:
        await client.wait_healthy(timeout=30)
        yield client
