"""The Connect protocol (binary protobuf codec) over httpx, and the mapping of its errors.

Why not connectrpc's generated clients: they are bound to pyqwest, a second HTTP stack with its own
connection pool, timeout model and error types, next to the httpx we need anyway for the plain
endpoints (streamed ``/files``, ``/init``, ``/health``). The parts of Connect the agent
uses are small and stable — unary calls (a POST of one message) and server streams (5-byte framed
envelopes ending in a JSON end-of-stream message) — so this module implements them over the same
``httpx.AsyncClient``: one connection pool per agent, one way to time out, one error translation.
Messages are the generated protobuf-py classes in :mod:`wrenbox.proto`.

Errors become :mod:`wrenbox.errors`: a Connect error by its code (:func:`error_for_code`), a plain
HTTP error by its status, a dead connection as :class:`Unavailable`, a passed deadline as
:class:`Timeout`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import httpx
from protobuf import Message

from wrenbox.errors import Timeout, Unavailable, WrenboxError, error_for_code

__all__ = [
    "Rpc",
    "ServerStream",
    "envelope",
    "error_for_response",
    "server_stream",
    "translate_errors",
    "unary",
]

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)

_UNARY_HEADERS = {"Content-Type": "application/proto", "Connect-Protocol-Version": "1"}
_STREAM_HEADERS = {"Content-Type": "application/connect+proto", "Connect-Protocol-Version": "1"}
_FLAG_COMPRESSED = 0x01
_FLAG_END_STREAM = 0x02
# One envelope holds one event: at most a 32 KiB output chunk or a directory listing. Anything
# bigger than this is a broken peer, not data worth buffering.
_MAX_MESSAGE = 64 * 1024 * 1024

# Connect's own table for HTTP errors that carry no Connect error body, with the /files statuses.
_CODE_OF_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    408: "deadline_exceeded",
    409: "already_exists",
    413: "invalid_argument",
    429: "unavailable",
    499: "canceled",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}


@dataclass(frozen=True, slots=True)
class Rpc(Generic[Req, Res]):
    """One Connect method: its URL path and response type."""

    path: str
    response: type[Res]


def error_for_response(status: int, body: bytes, what: str) -> WrenboxError:
    """The error for an HTTP error response: its Connect/envd JSON body if it has one, else its status."""
    code = _CODE_OF_STATUS.get(status, "unknown")
    message = body.decode("utf-8", "replace").strip()[:1000] or f"HTTP {status}"
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        if isinstance(decoded.get("code"), str):  # a Connect error
            code = decoded["code"]
        if isinstance(decoded.get("message"), str):
            message = decoded["message"]
    return error_for_code(code, f"{what}: {message}")


@contextmanager
def translate_errors(what: str, timeout: float | None = None) -> Iterator[None]:
    """Bound the block by ``timeout`` seconds and turn transport failures into wrenbox errors."""
    try:
        with anyio.fail_after(timeout):
            yield
    except TimeoutError as exc:
        raise Timeout(f"{what}: no answer within {timeout:g} s") from exc
    except httpx.TimeoutException as exc:
        raise Timeout(f"{what}: timed out ({type(exc).__name__})") from exc
    except httpx.RequestError as exc:
        raise Unavailable(f"{what}: agent unreachable ({type(exc).__name__}: {exc})") from exc


def _call_headers(
    headers: Mapping[str, str], base: Mapping[str, str], timeout: float | None
) -> dict[str, str]:
    merged = {**base, **headers}
    if timeout is not None:
        # Lets the agent stop working on a call the client has given up on.
        merged["Connect-Timeout-Ms"] = str(max(1, int(timeout * 1000)))
    return merged


async def unary(
    http: httpx.AsyncClient,
    rpc: Rpc[Req, Res],
    request: Message,
    *,
    headers: Mapping[str, str],
    timeout: float | None,
) -> Res:
    """Call a unary method; raise the wrenbox error the agent answered with."""
    with translate_errors(rpc.path, timeout):
        response = await http.post(
            rpc.path, content=request.to_binary(), headers=_call_headers(headers, _UNARY_HEADERS, timeout)
        )
    if response.status_code != 200:
        raise error_for_response(response.status_code, response.content, rpc.path)
    try:
        return rpc.response.from_binary(response.content)
    except Exception as exc:
        raise Unavailable(f"{rpc.path}: undecodable response from the agent: {exc}") from exc


class ServerStream(Generic[Res]):
    """The messages of one open server stream, read with :meth:`receive`.

    Reading is bounded by ``idle_timeout``: a stream on which the agent sends nothing, not even a
    keepalive, for that long is declared dead.
    """

    def __init__(self, rpc: Rpc[Any, Res], response: httpx.Response, idle_timeout: float | None) -> None:
        self._rpc = rpc
        self._chunks = response.aiter_raw()
        self._idle_timeout = idle_timeout
        self._buffer = bytearray()
        self._ended = False

    @property
    def ended(self) -> bool:
        """The end-of-stream message arrived."""
        return self._ended

    async def drain(self) -> None:
        """Read what follows the end-of-stream message (nothing, or HTTP framing), so that the
        connection goes back to the pool instead of being closed."""
        async for _ in self._chunks:
            pass

    async def receive(self) -> Res | None:
        """The next message, or ``None`` once the stream ended cleanly."""
        while not self._ended:
            envelope = self._take_envelope()
            if envelope is None:
                with translate_errors(self._rpc.path, self._idle_timeout):
                    chunk = await anext(self._chunks, None)
                if chunk is None:
                    raise Unavailable(f"{self._rpc.path}: the agent closed the stream mid-way")
                self._buffer += chunk
                continue
            flags, payload = envelope
            if flags & _FLAG_COMPRESSED:
                raise Unavailable(f"{self._rpc.path}: compressed message, but no compression was offered")
            if flags & _FLAG_END_STREAM:
                self._ended = True
                _raise_end_stream_error(payload, self._rpc.path)
                return None
            try:
                return self._rpc.response.from_binary(payload)
            except Exception as exc:
                raise Unavailable(f"{self._rpc.path}: undecodable message from the agent: {exc}") from exc
        return None

    def _take_envelope(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 5:
            return None
        size = int.from_bytes(buffer[1:5], "big")
        if size > _MAX_MESSAGE:
            raise Unavailable(f"{self._rpc.path}: {size}-byte message exceeds {_MAX_MESSAGE} bytes")
        if len(buffer) < 5 + size:
            return None
        flags, payload = buffer[0], bytes(buffer[5 : 5 + size])
        del buffer[: 5 + size]
        return flags, payload


def _raise_end_stream_error(payload: bytes, what: str) -> None:
    try:
        end = json.loads(payload) if payload else {}
    except ValueError as exc:
        raise Unavailable(f"{what}: malformed end-of-stream message") from exc
    error = end.get("error") if isinstance(end, dict) else None
    if isinstance(error, dict):
        code = error.get("code") if isinstance(error.get("code"), str) else "unknown"
        raise error_for_code(code, f"{what}: {error.get('message') or code}")


def envelope(payload: bytes) -> bytes:
    """One message of a Connect stream: flags 0, a 4-byte big-endian length, the payload."""
    return len(payload).to_bytes(5, "big") + payload


@asynccontextmanager
async def server_stream(
    http: httpx.AsyncClient,
    rpc: Rpc[Req, Res],
    request: Message,
    *,
    headers: Mapping[str, str],
    idle_timeout: float | None,
) -> AsyncIterator[ServerStream[Res]]:
    """Open a server stream; leaving the block closes it (the agent sees the client go away).

    Opening is not bounded here: the caller bounds opening plus the agent's first message.
    """
    body = envelope(request.to_binary())
    http_request = http.build_request(
        "POST", rpc.path, content=body, headers=_call_headers(headers, _STREAM_HEADERS, None)
    )
    with translate_errors(rpc.path):
        response = await http.send(http_request, stream=True)
    try:
        if response.status_code != 200:
            with translate_errors(rpc.path):
                await response.aread()
            raise error_for_response(response.status_code, response.content, rpc.path)
        stream = ServerStream(rpc, response, idle_timeout)
        yield stream
        if stream.ended:
            with anyio.move_on_after(1.0), translate_errors(rpc.path):
                await stream.drain()
    finally:
        await response.aclose()
