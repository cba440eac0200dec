"""``POST /init``: clock, entropy, environment, defaults, token; validated before anything changes.

The clock is faked (setting the host's real clock in a test would disturb the whole machine); the
entropy ioctls are harmless and run for real as root.
"""

from __future__ import annotations

import base64
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from wrenbox.guest.agent import Agent, AgentConfig
from wrenbox.guest.app import AgentApp
from wrenbox.guest.init import HostClock


class FakeHost(HostClock):
    def __init__(self, now: float) -> None:
        self._now = now
        self.clock_set: list[float] = []
        self.entropy: list[bytes] = []

    def now(self) -> float:
        return self._now

    def set_clock(self, when: float) -> None:
        self.clock_set.append(when)

    def add_entropy(self, data: bytes) -> None:
        self.entropy.append(data)


@pytest.fixture
def host() -> FakeHost:
    return FakeHost(now=1_800_000_000.0)


@pytest.fixture
async def client(host: FakeHost) -> AsyncIterator[tuple[httpx.AsyncClient, Agent]]:
    agent = Agent(AgentConfig(), host=host)
    transport = httpx.ASGITransport(app=AgentApp(agent))
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as c:
        yield c, agent
    agent.shutdown()


@pytest.mark.anyio
async def test_clock_only_moves_forward(client, host: FakeHost) -> None:
    c, _ = client
    assert (await c.post("/init", json={"timestamp": "2027-01-15T08:00:00.123456789Z"})).status_code == 204
    assert host.clock_set == [pytest.approx(1_800_000_000.123456, abs=1e-6)]  # 9 digits parsed
    assert (await c.post("/init", json={"timestamp": "2020-01-01T00:00:00Z"})).status_code == 204
    assert len(host.clock_set) == 1  # an older time is never applied


@pytest.mark.anyio
async def test_entropy_env_and_defaults(client, host: FakeHost, tmp_path: Path) -> None:
    c, agent = client
    seed = os.urandom(64)
    body = {
        "entropy": base64.b64encode(seed).decode(),
        "envVars": {"SANDBOX": "yes"},
        "defaultWorkdir": str(tmp_path),
        "defaultUser": agent.default_user.name,
    }
    assert (await c.post("/init", json=body)).status_code == 204
    assert host.entropy == [seed]
    assert (await c.get("/envs")).json() == {"SANDBOX": "yes"}
    assert agent.default_workdir == str(tmp_path)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        {"timestamp": "yesterday"},
        {"timestamp": "2027-01-01T00:00:00"},  # no zone
        {"envVars": {"A=B": "x"}},
        {"envVars": ["A"]},
        {"entropy": "***"},
        {"entropy": base64.b64encode(b"x" * 70_000).decode()},
        {"accessToken": ""},
        {"defaultWorkdir": "relative/dir"},
        {"defaultUser": "no-such-user-here"},
        [1, 2, 3],
    ],
)
async def test_bad_input_changes_nothing(client, host: FakeHost, body: object) -> None:
    c, agent = client
    everything_else = {"envVars": {"X": "1"}, "accessToken": "t", "timestamp": "2030-01-01T00:00:00Z"}
    payload = {**everything_else, **body} if isinstance(body, dict) else body
    response = await c.post("/init", json=payload)
    assert response.status_code == 400
    assert response.json()["message"]
    assert (host.clock_set, host.entropy, agent.env_vars, agent.access_token) == ([], [], {}, None)


@pytest.mark.anyio
async def test_metrics_fields(client) -> None:
    c, _ = client
    metrics = (await c.get("/metrics")).json()
    assert set(metrics) >= {
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "disk_total",
        "disk_used",
    }
    assert 0 < metrics["mem_used"] < metrics["mem_total"]
    assert 0 < metrics["disk_used"] <= metrics["disk_total"]
    assert 0 <= metrics["cpu_used_pct"] <= 100


@pytest.mark.root
def test_real_entropy_ioctls() -> None:
    """RNDADDENTROPY + RNDRESEEDCRNG on the host's /dev/random (mixing in bytes never weakens the pool):
    root's calls are accepted, and the same calls without CAP_SYS_ADMIN are refused with EPERM, which only
    the kernel's own handlers of these two ioctls do (/dev/random itself is writable by anyone)."""
    HostClock().add_entropy(os.urandom(32))
    assert _entropy_errno_as_nobody() == errno.EPERM


def _entropy_errno_as_nobody() -> int:
    """The errno of ``add_entropy`` in a child that has dropped to uid/gid 65534 (0: it succeeded)."""
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, only its exit status
        code = 255
        try:
            os.setgid(65534)
            os.setuid(65534)  # from root to another uid: the capabilities go too
            HostClock().add_entropy(os.urandom(32))
            code = 0
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
