"""The Firecracker API client against a raw HTTP server on a Unix socket: exact requests, and every way
an answer can go wrong mapped to a clear wrenbox error."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from wrenbox.errors import Timeout, Unavailable, WrenboxError
from wrenbox.vmm.firecracker.api import FirecrackerApi, FirecrackerApiError

pytestmark = pytest.mark.anyio

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


@asynccontextmanager
async def server(path: Path, handler: Handler) -> AsyncIterator[list[bytes]]:
    """A server answering each request with ``handler``; yields the raw requests it received."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            seen.append(request)
            await handler(request, writer)
            await writer.drain()
        except ConnectionError:
            pass  # the client stopped listening, as some tests make it
        finally:
            writer.close()

    srv = await asyncio.start_unix_server(serve, path=str(path))
    async with srv:
        yield seen


def answer(status: int, body: bytes = b"", reason: str = "X") -> Handler:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        headers = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
        if body:
            headers += "Content-Type: application/json\r\n"
        writer.write(headers.encode() + b"\r\n" + body)

    return handler


async def test_a_put_sends_exactly_the_json_body_and_a_204_is_none(tmp_path: Path) -> None:
    async with server(tmp_path / "api.sock", answer(204, reason="No Content")) as seen:
        api = FirecrackerApi(tmp_path / "api.sock")
        result = await api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 512})
    assert result is None
    [request] = seen
    head, body = request.split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"PUT /machine-config HTTP/1.1"
    headers = {k.lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert json.loads(body) == {"vcpu_count": 2, "mem_size_mib": 512}


async def test_a_get_returns_the_decoded_answer(tmp_path: Path) -> None:
    info = {"app_name": "Firecracker", "id": "anonymous-instance", "state": "Paused", "vmm_version": "1.7.0"}
    async with server(tmp_path / "api.sock", answer(200, json.dumps(info).encode(), "OK")) as seen:
        assert await FirecrackerApi(tmp_path / "api.sock").get("/") == info
    assert seen[0].startswith(b"GET / HTTP/1.1\r\n")
    assert b"content-length" not in seen[0].lower()


@pytest.mark.parametrize(
    ("status", "body", "fault"),
    [
        (400, b'{"fault_message": "The requested operation is not supported after starting the microVM."}',
         "The requested operation is not supported after starting the microVM."),
        (500, b"Internal error: snapshot file truncated", "Internal error: snapshot file truncated"),
        (400, b'{"error": "other shape"}', '{"error": "other shape"}'),
        (404, b"", "(no details given)"),
        (302, b"", "(no details given)"),
    ],
)  # fmt: skip
async def test_an_error_answer_carries_firecrackers_fault(
    tmp_path: Path, status: int, body: bytes, fault: str
) -> None:
    async with server(tmp_path / "api.sock", answer(status, body)):
        with pytest.raises(FirecrackerApiError) as caught:
            await FirecrackerApi(tmp_path / "api.sock").patch("/vm", {"state": "Paused"})
    error = caught.value
    assert (error.method, error.path, error.status, error.fault) == ("PATCH", "/vm", status, fault)
    assert str(error) == f"Firecracker refused PATCH /vm (HTTP {status}): {fault}"


async def test_a_call_that_is_not_answered_in_time_is_a_timeout(tmp_path: Path) -> None:
    async def never(request: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with server(tmp_path / "api.sock", never):
        api = FirecrackerApi(tmp_path / "api.sock", timeout=30)
        started = time.monotonic()
        with pytest.raises(Timeout, match=r"did not answer PUT /snapshot/create within 0.3 s"):
            await api.put("/snapshot/create", {}, timeout=0.3)
        assert time.monotonic() - started < 2


async def test_a_vmm_hanging_up_is_unavailable_and_says_why(tmp_path: Path) -> None:
    async def hang_up(request: bytes, writer: asyncio.StreamWriter) -> None:
        pass

    async def half_answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"state"')

    api = FirecrackerApi(tmp_path / "api.sock", why_gone=lambda: " (it crashed: see its log)")
    for handler in (hang_up, half_answer):
        async with server(tmp_path / "api.sock", handler):
            with pytest.raises(Unavailable, match=r"went away during GET /.*it crashed: see its log"):
                await api.get("/")


async def test_no_socket_or_nobody_listening_is_unavailable(tmp_path: Path) -> None:
    api = FirecrackerApi(tmp_path / "api.sock", why_gone=lambda: " (exited)")
    with pytest.raises(Unavailable, match=r"api.sock does not answer.*\(exited\)"):
        await api.get("/")


async def test_an_answer_that_is_not_http_or_json_is_refused(tmp_path: Path) -> None:
    async def garbage(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    async with server(tmp_path / "api.sock", garbage):
        with pytest.raises(WrenboxError, match="malformed answer to GET /"):
            await FirecrackerApi(tmp_path / "api.sock").get("/")
    async with server(tmp_path / "api.sock", answer(200, b"{not json")):
        with pytest.raises(WrenboxError, match="invalid JSON"):
            await FirecrackerApi(tmp_path / "api.sock").get("/")


async def test_an_answer_ended_by_closing_the_connection_is_complete(tmp_path: Path) -> None:
    async def close_delimited(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"firecracker_version": "1.7.0"}')

    async with server(tmp_path / "api.sock", close_delimited):
        answer = await FirecrackerApi(tmp_path / "api.sock").get("/version")
    assert answer == {"firecracker_version": "1.7.0"}


async def test_an_oversized_answer_is_refused(tmp_path: Path) -> None:
    async with server(tmp_path / "api.sock", answer(200, b'"' + b"x" * (2 << 20) + b'"')):
        with pytest.raises(WrenboxError, match=r"malformed answer.*larger than"):
            await FirecrackerApi(tmp_path / "api.sock").get("/")
