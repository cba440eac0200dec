"""Fixtures: a real agent (``python -m wrenbox.guest``) in a subprocess, and e2b SDK sandboxes on it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from wrenbox.pids import ProcessRef

# "h2c": HTTP/2 with prior knowledge. The e2b SDK asks for HTTP/2 by default, but its transport only
# gets it through ALPN on TLS and falls back to HTTP/1.1 on plain http:// (e2b 2.63), so the fixture
# makes its transport use prior knowledge, as a TLS-terminating proxy in front of envd would.
HTTP_VERSIONS = ["h2c", "1.1"]


@dataclass
class RunningAgent:
    url: str
    port: int
    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        ProcessRef.of(self.process.pid).terminate(grace=5)
        self.process.wait(timeout=5)


def start_agent(
    listen: str,
    log_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    python: Sequence[str] = (sys.executable,),
) -> RunningAgent:
    """Start ``python -m wrenbox.guest --listen LISTEN`` (``python``: the interpreter's command line) and
    wait until /health answers."""
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [*python, "-m", "wrenbox.guest", "--listen", listen, *args],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        env=env,
    )
    log_file.close()
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.fullmatch(r"listening on http://(.+):(\d+)\n", line)
    if not match:
        process.kill()
        process.wait()
        raise AssertionError(f"agent did not start: {line!r}\n{log_path.read_text()}")
    agent = RunningAgent(f"http://{match[1]}:{match[2]}", int(match[2]), process, log_path)
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(agent.url + "/health", timeout=1).status_code == 204:
                return agent
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            agent.stop()
            raise AssertionError("agent never answered /health")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    log_path = tmp_path_factory.mktemp("agent") / "agent.log"
    running = start_agent("127.0.0.1:0", log_path, "--log-level", "debug")
    yield running
    running.stop()


@pytest.fixture
def fresh_agent(tmp_path: Path) -> Iterator[RunningAgent]:
    """An agent of its own, for tests that change its state (access token, defaults)."""
    running = start_agent("127.0.0.1:0", tmp_path / "agent.log")
    yield running
    running.stop()


def force_h2c(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the e2b SDK's shared transport speak HTTP/2 with prior knowledge where it would pick h1."""
    import e2b.api.client_sync as transports
    from pyqwest import HTTPVersion, SyncHTTPTransport

    def h2c_transport(*args: object, http_version: object = None, **kwargs: object) -> SyncHTTPTransport:
        return SyncHTTPTransport(*args, http_version=http_version or HTTPVersion.HTTP2, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transports, "SyncHTTPTransport", h2c_transport)
    for cache in ("_transports", "_pools", "_httpx_transports"):
        monkeypatch.setattr(transports, cache, {})


@pytest.fixture(params=HTTP_VERSIONS)
def sandbox(request: pytest.FixtureRequest, agent: RunningAgent, monkeypatch: pytest.MonkeyPatch):
    """The official e2b SDK (debug mode) pointed at our agent, over h2c or HTTP/1.1."""
    from e2b import Sandbox

    if request.param == "h2c":
        force_h2c(monkeypatch)
        return Sandbox.create(debug=True, sandbox_url=agent.url, http_version="2")
    return Sandbox.create(debug=True, sandbox_url=agent.url, http_version="1.1")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path
