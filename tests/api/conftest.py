"""A real ``wrenbox serve`` (a subprocess, real VMs, its own data dir and network prefix) and E2B's SDK
pointed at it, the way a user does it: three environment variables.

One server per session; ``server.restart()`` stops it with SIGTERM (running sandboxes are paused) and
starts it again on the same port. Each test gets the SDK environment for the ``default`` team, and any
sandbox the test leaves is killed afterwards. At the end nothing may be left on the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from tests.sandbox.conftest import make_settings, take_down
from tests.support.images import scratch_data_dir

from wrenbox.config import Settings

TEMPLATE = "minimal"
_READY = re.compile(r"wrenbox serving on (http://\S+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(settings: Settings) -> dict[str, str]:
    net = settings.network
    return {
        **os.environ,
        "WRENBOX_DATA_DIR": str(settings.data_dir),
        "WRENBOX_MEMORY_DIR": str(settings.memory_dir),
        "WRENBOX_NETWORK__PREFIX": net.prefix,
        "WRENBOX_NETWORK__HOST_RANGE": str(net.host_range),
        "WRENBOX_NETWORK__TRANSFER_RANGE": str(net.transfer_range),
        "WRENBOX_DEFAULTS__MEMORY_MB": str(settings.defaults.memory_mb),
        "WRENBOX_LIMITS__MAX_SANDBOXES": "8",
        "WRENBOX_QUOTAS__MAX_RUNNING": "4",
        # A team whose quotas of paused sandboxes and templates are used up before it starts.
        "WRENBOX_QUOTAS__TEAMS": json.dumps({"frugal": {"max_paused": 0, "max_templates": 0}}),
        "WRENBOX_API__METRICS_INTERVAL_S": "1",
        "WRENBOX_API__HEAD_TIMEOUT_S": "3",  # so test_slowloris sees dribbling clients cut off soon
        "WRENBOX_API__TEMPLATES": json.dumps(["minimal", "base"]),
    }


def wrenbox(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``wrenbox`` CLI against the server's data dir."""
    return subprocess.run(
        [sys.executable, "-c", "from wrenbox.cli import main; main()", *args],
        env=server_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Server:
    settings: Settings
    port: int
    log_path: Path
    process: subprocess.Popen[str] | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from wrenbox.cli import main; main()",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
            ],
            env=server_env(self.settings),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the template is built first on a fresh data dir
        if not _READY.search(line):
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not start: {line!r}\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> int:
        """SIGTERM, as systemd does; the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self.process = None
        return code

    def restart(self) -> None:
        assert self.stop() == 0, self.log_path.read_text()[-4000:]
        self.start()

    def key(self, team: str = "default") -> str:
        if team not in self.keys:
            done = wrenbox(self.settings, "keys", "create", "--team", team, "--name", "tests", "--json")
            assert done.returncode == 0, done.stderr
            self.keys[team] = json.loads(done.stdout)["key"]
        return self.keys[team]

    def http(self, team: str | None = "default") -> httpx.Client:
        headers = {} if team is None else {"X-API-KEY": self.key(team)}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    root = scratch_data_dir("wba-")
    settings = make_settings(root, "wba", 47)
    running = Server(settings, _free_port(), root / "server.log")
    running.start()
    try:
        yield running
    finally:
        with running.http() as http:
            for sb in http.get("/v2/sandboxes").json():
                http.delete(f"/sandboxes/{sb['sandboxID']}")
        code = running.stop() if running.process else 0
        left = take_down(settings)
        log = running.log()
        shutil.copy(running.log_path, "/tmp/wrenbox-api-tests-server.log")  # for a post-mortem
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0, log[-4000:]
    assert "Traceback" not in log, log[-8000:]
    assert left == {}, f"the API tests left things behind: {left}"


@pytest.fixture
def e2b_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """E2B's SDK pointed at the server (the README's three variables) for the ``default`` team; every
    sandbox the test made is killed after it."""
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", server.key())
    monkeypatch.setenv("E2B_DOMAIN", server.settings.api.domain)
    with server.http() as http:
        before = {sb["sandboxID"] for sb in http.get("/v2/sandboxes").json()}
    yield server
    with server.http() as http:
        for sb in http.get("/v2/sandboxes").json():
            if sb["sandboxID"] not in before:
                http.delete(f"/sandboxes/{sb['sandboxID']}")


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
