"""A client for Firecracker's API: JSON over HTTP/1.1 on the VMM's Unix socket, one connection per call::

    api = FirecrackerApi(run_dir / "firecracker.sock", timeout=10.0, why_gone=log_tail)
    await api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 512})
    info = await api.get("/")
    await api.put("/snapshot/create", {...}, timeout=60.0)

Every call has a deadline: the client's default, or its own (snapshot calls get one sized by the guest's
memory). Outcomes map to wrenbox errors: an answer with a status of 300 or more is a
:class:`FirecrackerApiError` carrying Firecracker's ``fault_message``; a socket nobody answers on, or a VMM
that hangs up before it answered, is Unavailable (with ``why_gone()``, e.g. the VMM's log tail); a passed
deadline is Timeout.

A connection per call keeps nothing open between operations, so a VM handle needs no closing and works
from any event loop, also after a restart of wrenbox; a Unix-socket connect costs microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11

from wrenbox.errors import Timeout, Unavailable, WrenboxError

__all__ = ["FirecrackerApi", "FirecrackerApiError"]

_MAX_ANSWER = 1 << 20
_MAX_FAULT_CHARS = 2000


class FirecrackerApiError(WrenboxError):
    """Firecracker answered a call with an error status; ``fault`` is its ``fault_message``."""

    def __init__(self, method: str, path: str, status: int, fault: str) -> None:
        super().__init__(f"Firecracker refused {method} {path} (HTTP {status}): {fault}")
        self.method = method
        self.path = path
        self.status = status
        self.fault = fault


class FirecrackerApi:
    def __init__(
        self,
        socket_path: Path,
        *,
        timeout: float = 10.0,
        why_gone: Callable[[], str] = lambda: "",
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._why_gone = why_gone

    async def get(self, path: str, *, timeout: float | None = None) -> Any:
        return await self.call("GET", path, timeout=timeout)

    async def put(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        return await self.call("PUT", path, body, timeout=timeout)

    async def patch(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        return await self.call("PATCH", path, body, timeout=timeout)

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """One request; returns the decoded JSON answer (None for an empty one, e.g. 204)."""
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                status, answer = await self._exchange(method, path, body)
        except TimeoutError:
            raise Timeout(f"Firecracker did not answer {method} {path} within {limit:g} s") from None
        if status >= 300:
            raise FirecrackerApiError(method, path, status, _fault(answer))
        if not answer.strip():
            return None
        try:
            return json.loads(answer)
        except ValueError:
            raise WrenboxError(
                f"Firecracker answered {method} {path} with invalid JSON: {answer[:200]!r}"
            ) from None

    async def _exchange(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes]:
        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(self.socket_path))
        except OSError as exc:
            raise Unavailable(
                f"Firecracker API socket {self.socket_path} does not answer ({exc.strerror or exc})"
                f"{self._why_gone()}"
            ) from None
        try:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_ANSWER)
            writer.write(_request(conn, method, path, body))
            await writer.drain()
            return await _answer(conn, reader)
        except ConnectionError as exc:
            raise Unavailable(
                f"Firecracker went away during {method} {path} ({exc}){self._why_gone()}"
            ) from None
        except h11.RemoteProtocolError as exc:
            raise WrenboxError(f"Firecracker sent a malformed answer to {method} {path}: {exc}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _request(conn: h11.Connection, method: str, path: str, body: dict[str, Any] | None) -> bytes:
    headers = [("Host", "localhost"), ("Accept", "application/json")]
    payload = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    out = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
    if payload:
        out += conn.send(h11.Data(data=payload)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


async def _answer(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one response: its status and its whole body (at most _MAX_ANSWER bytes)."""
    status, eof = 0, False
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if eof:
                raise ConnectionResetError("it closed the connection mid-answer") from None
            raise
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and not status:
                raise ConnectionResetError("it closed the connection without answering")
            eof = not data
            conn.receive_data(data)  # b"" is the end, which may also end an answer sized by it
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_ANSWER:
                raise h11.RemoteProtocolError(f"answer larger than {_MAX_ANSWER} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("it closed the connection without answering")


def _fault(answer: bytes) -> str:
    """Firecracker's ``{"fault_message": ...}``, or the raw answer when it is not that shape."""
    with contextlib.suppress(ValueError):
        decoded = json.loads(answer)
        if isinstance(decoded, dict) and isinstance(decoded.get("fault_message"), str):
            return decoded["fault_message"][:_MAX_FAULT_CHARS]
    text = answer.decode(errors="replace").strip()
    return text[:_MAX_FAULT_CHARS] or "(no details given)"
