"""Checking the Connect envelopes of a streaming request before connectrpc reads them.

connectrpc answers a malformed request stream with codes that blame the server (``internal`` for a
compressed flag it cannot honour, ``unimplemented`` for a frame cut short or a server stream given no
message or two). Those are the client's mistakes: this guard sits between the ASGI ``receive`` and
connectrpc, follows the 5-byte envelope headers as the body arrives, and ends the call with
``invalid_argument`` (HTTP 400 for the client) instead. It never buffers the body.
"""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from .asgi import Message, Receive, Scope

__all__ = ["SERVER_STREAMS", "guard_envelopes"]

# Methods whose request is exactly one message in a stream envelope.
SERVER_STREAMS = frozenset(
    {"/process.Process/Start", "/process.Process/Connect", "/filesystem.Filesystem/WatchDir"}
)
_COMPRESSED, _END_STREAM = 0x01, 0x02
_HEADER = 5


class _Envelopes:
    """Where the body is in its sequence of envelopes."""

    def __init__(self, compressed_ok: bool, exactly_one: bool) -> None:
        self._compressed_ok = compressed_ok
        self._exactly_one = exactly_one
        self._header = bytearray()
        self._left = 0  # payload bytes of the current envelope still to come
        self.count = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left:
                step = min(self._left, len(view))
                self._left -= step
                view = view[step:]
                continue
            need = _HEADER - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == _HEADER:
                self._start(self._header[0], int.from_bytes(self._header[1:], "big"))
                self._header.clear()

    def _start(self, flags: int, length: int) -> None:
        if flags & ~_COMPRESSED or (flags & _COMPRESSED and not self._compressed_ok):
            raise _invalid(f"a request envelope has flags {flags:#04x}: only 0x00 (or 0x01 if compressed)")
        self.count += 1
        if self._exactly_one and self.count > 1:
            raise _invalid("this method takes one request message; the stream has more")
        self._left = length

    def end(self) -> None:
        if self._header or self._left:
            raise _invalid("the request body ended inside an envelope")
        if self._exactly_one and self.count != 1:
            raise _invalid("this method takes one request message; the stream has none")


def guard_envelopes(scope: Scope, receive: Receive) -> Receive:
    """``receive`` for connectrpc, checking a Connect streaming request's envelopes as they pass."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    if not headers.get("content-type", "").lower().startswith("application/connect+"):
        return receive  # unary: no envelopes (connectrpc answers 415 for other streaming types)
    encoding = headers.get("connect-content-encoding", "identity").strip().lower()
    envelopes = _Envelopes(encoding not in ("", "identity"), scope["path"] in SERVER_STREAMS)
    body_done = False

    async def checked() -> Message:
        nonlocal body_done
        message = await receive()
        if body_done or message["type"] != "http.request":
            return message
        envelopes.feed(message.get("body", b""))
        if not message.get("more_body", False):
            body_done = True
            envelopes.end()
        return message

    return checked


def _invalid(message: str) -> ConnectError:
    return ConnectError(Code.INVALID_ARGUMENT, message)
