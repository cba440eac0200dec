"""Agent-wide calls (health, init, envs, metrics), the access token, and failures of the link."""

from __future__ import annotations

import getpass
import socket
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import anyio
import httpx
import pytest

from wrenbox.envd import AsyncEnvdClient, EnvdConfig
from wrenbox.errors import GuestError, InvalidArgument, Timeout, Unavailable

pytestmark = pytest.mark.anyio


async def test_init_sets_env_vars_for_new_processes(envd: Any) -> None:
    await envd.init(env_vars={"WRENBOX_ENVD_TEST": "from-init"})
    assert (await envd.envs())["WRENBOX_ENVD_TEST"] == "from-init"
    result = await envd.processes.exec('echo "$WRENBOX_ENVD_TEST"')
    assert result.stdout == b"from-init\n"


async def test_init_defaults_apply_to_later_commands(fresh_agent: Any, connect: Any, tmp_path: Any) -> None:
    envd = connect(fresh_agent.url)
    await envd.wait_healthy(timeout=30)
    me = getpass.getuser()  # the agent runs as us; it can only switch to users it may become
    await envd.init(default_workdir=str(tmp_path), default_user=me, entropy=b"\x01" * 32)
    result = await envd.processes.exec("pwd; id -un")
    assert result.stdout.decode().split() == [str(tmp_path), me]
    with pytest.raises(InvalidArgument, match="timezone"):
        await envd.init(timestamp=datetime(2030, 1, 1))


async def test_metrics(envd: Any) -> None:
    metrics = await envd.metrics()
    assert metrics.cpu_count >= 1
    assert 0 < metrics.mem_used <= metrics.mem_total
    assert 0 < metrics.disk_used <= metrics.disk_total


async def test_warm_up_speaks_the_sdks_encodings(fresh_agent: Any, connect: Any) -> None:
    client = connect(fresh_agent.url)
    await client.wait_healthy(timeout=30)
    await client.init(access_token="warm-token")
    await client.warm_up()  # JSON Connect stream and unary calls, and /files, all answered 200
    with pytest.raises(GuestError, match="unauthenticated"):
        await connect(fresh_agent.url).warm_up()


async def test_access_token_is_enforced_after_init(fresh_agent: Any, connect: Any) -> None:
    owner = connect(fresh_agent.url)
    await owner.wait_healthy(timeout=30)
    await owner.init(access_token="s3cret-token")
    # The client that set the token uses it from then on.
    assert (await owner.processes.exec(["true"])).ok
    assert isinstance(await owner.envs(), dict)

    for stranger in (connect(fresh_agent.url), connect(fresh_agent.url, access_token="wrong")):
        with pytest.raises(GuestError, match="unauthenticated"):
            await stranger.processes.exec(["true"])
        with pytest.raises(GuestError, match="unauthenticated"):
            await stranger.processes.list()
        with pytest.raises(GuestError, match="unauthenticated"):
            await stranger.files.stat("/")
        with pytest.raises(GuestError, match="unauthenticated"):
            async with stranger.files.download("/etc/hostname") as chunks:
                async for _ in chunks:
                    pass
        with pytest.raises(GuestError, match="unauthenticated"):
            await stranger.envs()

    configured = connect(fresh_agent.url, access_token="s3cret-token")
    assert (await configured.processes.exec(["true"])).ok


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: the client's own deadlines must fire."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_unreachable_agent_is_unavailable(connect: Any, closed_port: int) -> None:
    envd = connect(f"http://127.0.0.1:{closed_port}")
    with pytest.raises(Unavailable):
        await envd.processes.list()
    with pytest.raises(Unavailable):
        await envd.files.upload("/tmp/x", b"x")
    with pytest.raises(Timeout, match="not healthy"):
        await envd.wait_healthy(timeout=0.3, interval=0.05)


async def test_silent_agent_times_out(connect: Any, silent_server: str) -> None:
    envd = connect(silent_server, request_timeout=0.3)
    for call in (envd.processes.list, envd.envs, lambda: envd.files.stat("/")):
        with anyio.fail_after(5), pytest.raises(Timeout):
            await call()
    with anyio.fail_after(5), pytest.raises(Timeout):
        async with envd.processes.exec_stream(["true"]):
            pass
    with anyio.fail_after(5), pytest.raises(Timeout):
        await envd.processes.exec(["true"], timeout=0.5)


@pytest.mark.parametrize(
    "bad",
    [
        {"base_url": "ftp://host"},
        {"base_url": "http://"},
        {"base_url": "http://h?x=1"},
        {"request_timeout": 0},
        {"connect_timeout": float("nan")},
        {"output_cap": -1},
        {"keepalive_interval": 0},
        {"headers": {"X-Bad": "a\nb"}},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        EnvdConfig(**bad)


def test_config_is_frozen_all_the_way_down() -> None:
    headers = {"E2b-Sandbox-Id": "abc"}
    config = EnvdConfig(headers=headers)
    headers["E2b-Sandbox-Id"] = "changed"
    assert config.headers["E2b-Sandbox-Id"] == "abc"
    with pytest.raises(TypeError):
        config.headers["x"] = "y"  # type: ignore[index]


async def test_http2_prior_knowledge(agent: Any, connect: Any, tmp_path: Any) -> None:
    envd = connect(agent.url, http2=True)
    assert (await envd.processes.exec("echo h2")).stdout == b"h2\n"
    await envd.files.upload(str(tmp_path / "f"), b"over h2")
    async with envd.files.download(str(tmp_path / "f")) as chunks:
        assert b"".join([chunk async for chunk in chunks]) == b"over h2"
    async with envd.processes.exec_stream(["sh", "-c", "echo one; echo two"]) as proc:
        await proc.collect(100)
    if hasattr(envd, "_channel"):  # the async flavour: check the wire really was HTTP/2
        response = await envd._channel.http.get("/health")
        assert response.http_version == "HTTP/2"


class RecordingTransport(httpx.AsyncBaseTransport):
    """The routing seam: a transport that forwards to the real agent and remembers each request."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_every_request_goes_through_the_transport_seam(agent: Any, tmp_path: Any) -> None:
    transport = RecordingTransport()
    config = EnvdConfig(base_url=agent.url, user="root", headers={"E2b-Sandbox-Id": "sbx1"})
    async with AsyncEnvdClient(config, transport=transport) as envd:
        await envd.processes.exec(["true"])
        await envd.files.upload(str(tmp_path / "f"), b"x")
        await envd.files.stat(str(tmp_path / "f"))
    start, upload, stat = transport.requests
    assert all(request.headers["E2b-Sandbox-Id"] == "sbx1" for request in transport.requests)
    assert start.url.path == "/process.Process/Start"
    assert start.headers["Authorization"] == "Basic cm9vdDo="  # "root:" — user name, empty password
    assert start.headers["Content-Type"] == "application/connect+proto"
    assert start.headers["Keepalive-Ping-Interval"] == "30"
    assert (upload.url.path, upload.url.params["username"]) == ("/files", "root")
    assert upload.headers["Content-Type"] == "application/octet-stream"
    assert stat.url.path == "/filesystem.Filesystem/Stat"
    assert stat.headers["Content-Type"] == "application/proto"


@pytest.mark.root
async def test_commands_and_files_as_another_user(envd: Any, tmp_path: Any) -> None:
    assert (await envd.processes.exec("id -un", user="nobody")).stdout == b"nobody\n"
    tmp_path.chmod(0o777)
    await envd.files.upload(str(tmp_path / "owned"), b"x", user="nobody")
    assert (await envd.files.stat(str(tmp_path / "owned"))).owner == "nobody"
    with pytest.raises(GuestError, match="does not exist"):
        await envd.processes.exec("true", user="no-such-user")
