"""A rewritten agent attacks the host's client: every answer a guest can shape is bounded.

The "agent" here is a small HTTP server on loopback that answers whatever bytes a test scripts (a
guest that replaced envd can send anything), in front of the real :class:`AsyncEnvdClient`. Each test
is an attack from ``security-2026-12-05.md`` (findings 1, 5, 6, 14) and says what the host must keep:
its memory, its event loop (another agent keeps answering), its deadline, its error mapping.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from wrenbox.envd import AsyncEnvdClient, EnvdConfig
from wrenbox.envd.connect import envelope
from wrenbox.errors import GuestError, NotFound, Timeout
from wrenbox.proto.filesystem import filesystem_pb as fs

pytestmark = pytest.mark.anyio

Writer = asyncio.StreamWriter
Answer = Callable[[str, Writer], Awaitable[None]]


def _bomb(inflated: int, layers: int = 2) -> bytes:
    """``inflated`` zero bytes, gzipped ``layers`` times: a few KiB on the wire."""
    data = gzip.compress(b"\0" * inflated, 9)
    for _ in range(layers - 1):
        data = gzip.compress(data, 9)
    return data


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def canned(status: int, body: bytes, **headers: str) -> Answer:
    async def answer(_: str, w: Writer) -> None:
        w.write(_head(status, {"Content-Length": str(len(body)), **headers}) + body)

    return answer


@asynccontextmanager
async def hostile_agent(answers: dict[str, Answer]) -> AsyncIterator[str]:
    """A server on a free loopback port answering each path with its scripted bytes."""

    async def handle(reader: asyncio.StreamReader, writer: Writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode().split("\r\n")
                path = line.split()[1].split("?")[0]
                length = next(
                    (int(f.split(":")[1]) for f in fields if f.lower().startswith("content-length")), 0
                )
                if any(f.lower().startswith("transfer-encoding") for f in fields):
                    while (size := int((await reader.readline()).strip() or b"0", 16)) > 0:
                        await reader.readexactly(size + 2)
                    await reader.readline()
                else:
                    await reader.readexactly(length)
                await answers[path](path, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def _client(url: str, **config: Any) -> AsyncEnvdClient:
    return AsyncEnvdClient(EnvdConfig(base_url=url, **config))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _attacked(attack: Callable[[], Awaitable[object]], healthy_url: str) -> float:
    """Run ``attack`` while another agent is polled; the slowest answer of the bystander, in seconds."""
    slowest = 0.0
    done = anyio.Event()

    async def bystander() -> None:
        nonlocal slowest
        async with _client(healthy_url) as other:
            while not done.is_set():
                t0 = time.monotonic()
                await other.wait_healthy(timeout=5)
                slowest = max(slowest, time.monotonic() - t0)
                await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(bystander)
        try:
            await attack()
        finally:
            done.set()
    return slowest


async def test_stacked_gzip_bombs_are_refused_unread() -> None:
    bomb = _bomb(512 << 20)  # 512 MiB of zeros in ≈ 1 KiB
    assert len(bomb) < 4096
    encoded = {"Content-Encoding": "gzip, gzip", "Content-Type": "application/json"}
    answers = {
        "/init": canned(500, bomb, **encoded),
        "/metrics": canned(200, bomb, **encoded),
        "/envs": canned(200, bomb, **{"Content-Encoding": "gzip"}),
        "/files": canned(200, bomb, **{"Content-Encoding": "gzip"}),
        "/filesystem.Filesystem/Stat": canned(200, bomb, **{"Content-Encoding": "gzip"}),
        "/health": canned(204, b""),
    }
    before = _peak_rss_mib()
    healthy = {"/health": canned(204, b"")}
    async with hostile_agent(answers) as bad, hostile_agent(healthy) as good, _client(bad) as envd:

        async def attack() -> None:
            for call in (
                lambda: envd.init(access_token="t"),
                envd.metrics,
                envd.envs,
                lambda: envd.files.stat("/"),
            ):
                with pytest.raises(GuestError, match="encoded body, which was not asked for"):
                    await call()
            with pytest.raises(GuestError, match="encoded"):
                async with envd.files.download("/etc/passwd") as chunks:
                    async for _ in chunks:
                        pass

        slowest = await _attacked(attack, good)
    assert _peak_rss_mib() - before < 32, "the manager inflated a guest's bomb"
    assert slowest < 1.0


async def test_oversized_bodies_and_frames_stop_at_the_cap() -> None:
    huge = 64 << 20  # announced, never sent
    lying = {"Content-Length": str(huge), "Content-Type": "application/proto"}

    async def endless(_: str, w: Writer) -> None:
        # No Content-Length: the body runs until the connection closes, well past any cap.
        w.write(_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}))
        block = b"x" * 65536
        for _ in range(1024):  # up to 64 MiB
            w.write(b"%x\r\n%s\r\n" % (len(block), block))
            await w.drain()

    async def big_frame(_: str, w: Writer) -> None:
        w.write(_head(200, {"Content-Type": "application/connect+proto", "Transfer-Encoding": "chunked"}))
        frame = b"\0" + (100 << 20).to_bytes(4, "big")  # announces a 100 MiB message
        w.write(b"%x\r\n%s\r\n" % (len(frame), frame))

    answers = {
        "/filesystem.Filesystem/ListDir": canned(200, b"", **lying),
        "/metrics": endless,
        "/process.Process/Start": big_frame,
    }
    before = _peak_rss_mib()
    healthy = {"/health": canned(204, b"")}
    async with hostile_agent(answers) as bad, hostile_agent(healthy) as good, _client(bad) as envd:

        async def attack() -> None:
            with pytest.raises(GuestError, match="announced 67108864 bytes"):
                await envd.files.list_dir("/")
            with pytest.raises(GuestError, match="more than 65536 bytes"):
                await envd.metrics()
            with pytest.raises(GuestError, match="exceeds 1048576 bytes"):
                await envd.processes.exec(["true"])

        slowest = await _attacked(attack, good)
    assert _peak_rss_mib() - before < 32
    assert slowest < 1.0


async def test_a_listing_of_countless_tiny_entries_is_refused_before_decoding() -> None:
    tiny = b"\x0a\x00" * 200_000  # 200k empty entries in 400 KB: ≈ 60 MB of Python objects decoded
    real = fs.ListDirResponse(entries=[fs.EntryInfo(name=f"f{i}", path=f"/d/f{i}") for i in range(3)])
    answers = {
        "/filesystem.Filesystem/ListDir": canned(200, tiny, **{"Content-Type": "application/proto"}),
        "/filesystem.Filesystem/Stat": canned(200, real.to_binary(), **{"Content-Type": "application/proto"}),
    }
    async with hostile_agent(answers) as bad, _client(bad) as envd:
        with pytest.raises(GuestError, match="more than 100000 fields"):
            await envd.files.list_dir("/")


async def test_a_trickling_transfer_runs_out_of_time() -> None:
    async def trickle(_: str, w: Writer) -> None:
        w.write(_head(200, {"Content-Length": "1000000", "Content-Type": "application/octet-stream"}))
        for _ in range(60):  # one byte a quarter second: every read is quick, the whole is hopeless
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(0.25)

    async with hostile_agent({"/files": trickle}) as bad, _client(bad, request_timeout=1.0) as envd:
        t0 = time.monotonic()
        with pytest.raises(Timeout, match="too slow"):
            async with envd.files.download("/big") as chunks:
                async for _ in chunks:
                    pass
        assert time.monotonic() - t0 < 5


async def test_a_guest_cannot_speak_for_the_api_caller() -> None:
    deep = b'{"code": "not_found", "message": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    flood = json.dumps({"code": "not_found", "message": "\x1b[31m" + "A" * 50_000}).encode()
    end = json.dumps({"error": {"code": "unauthenticated", "message": "your API key is wrong"}}).encode()

    async def end_stream(_: str, w: Writer) -> None:
        body = bytes([2]) + len(end).to_bytes(4, "big") + end
        w.write(_head(200, {"Content-Type": "application/connect+proto", "Content-Length": str(len(body))}))
        w.write(body)

    answers = {
        "/filesystem.Filesystem/Stat": canned(400, deep, **{"Content-Type": "application/json"}),
        "/filesystem.Filesystem/Remove": canned(404, flood, **{"Content-Type": "application/json"}),
        "/process.Process/Start": end_stream,
    }
    async with hostile_agent(answers) as bad, _client(bad) as envd:
        with pytest.raises(GuestError):  # not a RecursionError escaping the client
            await envd.files.stat("/")
        with pytest.raises(NotFound) as found:
            await envd.files.remove("/x")
        assert len(found.value.message) < 1100
        assert "\x1b" not in found.value.message
        with pytest.raises(GuestError, match="your API key is wrong") as caught:
            await envd.processes.exec(["true"])
        assert caught.value.http_status == 502
        assert not caught.value.retryable
    assert envelope(b"") == b"\0\0\0\0\0"
