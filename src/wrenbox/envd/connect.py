"""The Connect protocol (binary protobuf codec) over httpx, and the mapping of its errors.

Why not connectrpc's generated clients: they are bound to pyqwest, a second HTTP stack with its own
connection pool, timeout model and error types, next to the httpx we need anyway for the plain
endpoints (streamed ``/files``, ``/init``, ``/health``). The parts of Connect the agent
uses are small and stable — unary calls (a POST of one message) and server streams (5-byte framed
envelopes ending in a JSON end-of-stream message) — so this module implements them over the same
``httpx.AsyncClient``: one connection pool per agent, one way to time out, one error translation.
Messages are the generated protobuf-py classes in :mod:`wrenbox.proto`.

Errors become :mod:`wrenbox.errors`: a Connect error by its code, a plain HTTP error by its status, a dead
connection as :class:`Unavailable`, a passed deadline as :class:`Timeout`. The guest chooses those codes,
so only the ones that describe its own files and processes pass as they are; the rest (an "unauthenticated"
that would tell an API caller their key is wrong, an "unavailable" that would make them retry forever)
become :class:`GuestError`. Every body is read within :mod:`wrenbox.envd.limits`.
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

from wrenbox.envd.limits import (
    MAX_ERROR_BODY,
    MAX_MESSAGE,
    MAX_UNARY,
    OFFLOAD_DECODE,
    check_identity,
    clean_text,
    count_fields,
    read_body,
)
from wrenbox.errors import GuestError, Timeout, Unavailable, WrenboxError, error_for_code

__all__ = [
    "Answer",
    "Rpc",
    "ServerStream",
    "envelope",
    "error_for_response",
    "exchange",
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
# What a guest may say about its own files and processes; any other code it sends is a GuestError.
_GUEST_CODES = frozenset(
    {
        "invalid_argument",
        "not_found",
        "already_exists",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "permission_denied",
        "deadline_exceeded",
        "canceled",
        "unimplemented",
    }
)

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


def guest_error(code: object, message: object, what: str) -> WrenboxError:
    """The wrenbox error for an error the agent reported (its code and message are the guest's words)."""
    text = clean_text(message if isinstance(message, str) and message else str(code))
    if isinstance(code, str) and code in _GUEST_CODES:
        return error_for_code(code, f"{what}: {text}")
    shown = clean_text(str(code), 40)
    return GuestError(f"{what}: the agent failed ({shown}): {text}", code if isinstance(code, str) else None)


def error_for_response(status: int, body: bytes, what: str, *, from_guest: bool = True) -> WrenboxError:
    """The error for an HTTP error response: its Connect/envd JSON body if it has one, else its status.
    ``from_guest=False`` for a peer the host trusts (a wrenbox server): its codes are taken as they are."""
    code: object = _CODE_OF_STATUS.get(status, "unknown")
    message: object = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    decoded = _json(body)
    if isinstance(decoded, dict):
        found = decoded.get("code")
        if isinstance(found, str):  # a Connect error
            code = found
        elif isinstance(found, int) and not isinstance(found, bool):  # envd's /files errors: a status
            code = _CODE_OF_STATUS.get(found, code)
        message = decoded.get("message", message)
    if not from_guest:
        return error_for_code(str(code), f"{what}: {clean_text(str(message))}")
    return guest_error(code, message, what)


def _json(data: bytes) -> object:
    """Decoded JSON from the guest, or None; nesting deep enough to exhaust the stack counts as invalid."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole (bounded) answer of the agent."""

    status: int
    body: bytes

    def json(self, what: str) -> Any:
        decoded = _json(self.body)
        if decoded is None:
            raise GuestError(f"{what}: the agent answered with invalid JSON")
        return decoded

    def json_object(self, what: str) -> dict[str, Any]:
        decoded = self.json(what)
        if not isinstance(decoded, dict):
            raise GuestError(f"{what}: expected a JSON object from the agent")
        return decoded


async def exchange(
    http: httpx.AsyncClient, request: httpx.Request, *, what: str, limit: int, timeout: float | None
) -> Answer:
    """Send ``request`` and read its whole answer raw: at most ``limit`` bytes of a success, at most
    :data:`~wrenbox.envd.limits.MAX_ERROR_BODY` of an error, within ``timeout`` seconds overall."""
    with translate_errors(what, timeout):
        response = await http.send(request, stream=True)
        try:
            cap = limit if response.status_code < 300 else MAX_ERROR_BODY
            return Answer(response.status_code, await read_body(response, cap, what))
        finally:
            await response.aclose()


async def decode(message: type[Res], data: bytes, what: str) -> Res:
    """A protobuf message from the guest: its fields counted first, big ones decoded in a worker thread."""
    try:
        count_fields(data)
        if len(data) < OFFLOAD_DECODE:
            return message.from_binary(data)
        return await anyio.to_thread.run_sync(message.from_binary, data)
    except GuestError as exc:
        raise GuestError(f"{what}: {exc.message}") from None
    except Exception as exc:
        raise GuestError(f"{what}: undecodable message from the agent: {clean_text(str(exc), 200)}") from exc


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
    http_request = http.build_request(
        "POST", rpc.path, content=request.to_binary(), headers=_call_headers(headers, _UNARY_HEADERS, timeout)
    )
    answer = await exchange(http, http_request, what=rpc.path, limit=MAX_UNARY, timeout=timeout)
    if answer.status != 200:
        raise error_for_response(answer.status, answer.body, rpc.path)
    return await decode(rpc.response, answer.body, rpc.path)


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
                raise GuestError(f"{self._rpc.path}: compressed message, but no compression was offered")
            if flags & _FLAG_END_STREAM:
                self._ended = True
                _raise_end_stream_error(payload, self._rpc.path)
                return None
            return await decode(self._rpc.response, payload, self._rpc.path)
        return None

    def _take_envelope(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 5:
            return None
        size = int.from_bytes(buffer[1:5], "big")
        if size > MAX_MESSAGE:
            raise GuestError(f"{self._rpc.path}: {size}-byte message exceeds {MAX_MESSAGE} bytes")
        if len(buffer) < 5 + size:
            return None
        flags, payload = buffer[0], bytes(buffer[5 : 5 + size])
        del buffer[: 5 + size]
        return flags, payload


def _raise_end_stream_error(payload: bytes, what: str) -> None:
    end = _json(payload) if payload else {}
    if not isinstance(end, dict):
        raise GuestError(f"{what}: malformed end-of-stream message")
    error = end.get("error")
    if isinstance(error, dict):
        raise guest_error(error.get("code", "unknown"), error.get("message"), what)


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
            with translate_errors(rpc.path, idle_timeout):
                body = await read_body(response, MAX_ERROR_BODY, rpc.path)
            raise error_for_response(response.status_code, body, rpc.path)
        check_identity(response, rpc.path)
        stream = ServerStream(rpc, response, idle_timeout)
        yield stream
        if stream.ended:
            with anyio.move_on_after(1.0), translate_errors(rpc.path):
                await stream.drain()
    finally:
        await response.aclose()
