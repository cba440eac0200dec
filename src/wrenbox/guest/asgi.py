"""The few ASGI helpers the plain HTTP endpoints need (no framework: each import costs in a guest)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from wrenbox.errors import InvalidArgument, WrenboxError

__all__ = [
    "BodyStalled",
    "Receive",
    "Request",
    "Scope",
    "Send",
    "send_error",
    "send_json",
    "send_status",
    "stall_limited",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_SMALL_BODY = 1 << 20  # JSON bodies (/init); files stream instead


class BodyStalled(WrenboxError):
    """The client stopped sending its request body (408: the connection is not worth holding)."""

    code = "canceled"
    http_status = 408


def stall_limited(receive: Receive, seconds: float, stalled: Callable[[str], Exception]) -> Receive:
    """``receive`` that gives up on a request body when no part of it arrives for ``seconds``.

    The server's own timers only cover a connection between requests: a client that sends its headers
    and then dribbles (or never finishes) its body would hold a request open forever. Once the body is
    complete, waiting (for the client to disconnect) is unlimited again: responses may stream for hours.
    """
    body_done = False

    async def limited() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), seconds)
        except TimeoutError:
            raise stalled(f"no part of the request body arrived for {seconds:g} s") from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            body_done = True
        return message

    return limited


class Request:
    """One HTTP request: method, path, query, headers and a streamed body."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())
        }
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (the first of repeated ones); InvalidArgument if not UTF-8."""
        if self._query is None:
            raw = self.scope.get("query_string", b"").decode("latin-1")
            try:
                pairs = parse_qsl(raw, keep_blank_values=True, errors="strict")
            except UnicodeDecodeError:
                raise InvalidArgument("query parameters must be UTF-8") from None
            query: dict[str, str] = {}
            for key, value in pairs:
                query.setdefault(key, value)
            self._query = query
        return self._query

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The request body as it arrives; never the whole body at once."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("client disconnected during the request body")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def json(self) -> Any:
        """The body parsed as JSON (empty body: None); InvalidArgument if malformed or too large."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.body_chunks():
            size += len(chunk)
            if size > MAX_SMALL_BODY:
                raise InvalidArgument(f"request body is larger than {MAX_SMALL_BODY} bytes")
            parts.append(chunk)
        if not size:
            return None
        try:
            return json.loads(b"".join(parts))
        except ValueError as err:
            raise InvalidArgument(f"request body is not valid JSON: {err}") from None


async def send_status(send: Send, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": b""})


async def send_json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: WrenboxError, status: int | None = None) -> None:
    """An envd-style JSON error body: ``{"code": <http status>, "message": ...}``."""
    code = status or error.http_status
    await send_json(send, code, {"code": code, "message": error.message})
