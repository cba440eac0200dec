"""A minimal Connect-protocol client for tests, independent of connectrpc: raw httpx and envelopes."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from protobuf import Message

END_STREAM = 0x02


@dataclass
class StreamResult:
    messages: list[Any]
    end: dict[str, Any]  # the end-stream message ({} on success, {"error": {...}} on failure)


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def encode(message: Message, codec: str) -> bytes:
    return message.to_json().encode() if codec == "json" else message.to_binary()


def decode(data: bytes, cls: type[Message], codec: str) -> Message:
    return cls.from_json(data) if codec == "json" else cls.from_binary(data)


def unary(
    client: httpx.Client,
    path: str,
    message: Message,
    response_cls: type[Message],
    codec: str = "json",
    headers: dict[str, str] | None = None,
) -> Message:
    response = client.post(
        path,
        content=encode(message, codec),
        headers={"content-type": f"application/{codec if codec == 'json' else 'proto'}", **(headers or {})},
    )
    if response.status_code != 200:
        raise ConnectFailure(response.status_code, response.json())
    return decode(response.content, response_cls, codec)


def iter_envelopes(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= 5:
            flags, length = struct.unpack(">BI", buffer[:5])
            if len(buffer) < 5 + length:
                break
            yield flags, buffer[5 : 5 + length]
            buffer = buffer[5 + length :]


@contextlib.contextmanager
def stream_request(
    client: httpx.Client,
    path: str,
    message: Message,
    codec: str = "json",
    headers: dict[str, str] | None = None,
) -> Iterator[httpx.Response]:
    """Open a server stream; read it with :func:`read_stream`. Leaving the block closes it."""
    request = client.build_request(
        "POST",
        path,
        content=envelope(encode(message, codec)),
        headers={
            "content-type": f"application/connect+{codec if codec == 'json' else 'proto'}",
            **(headers or {}),
        },
    )
    response = client.send(request, stream=True)
    try:
        yield response
    finally:
        response.close()


def read_stream(
    response: httpx.Response, response_cls: type[Message], codec: str = "json"
) -> Iterator[Message | dict]:
    """Messages of a server stream, then the end-stream dict as the last item."""
    for flags, payload in iter_envelopes(response.iter_raw()):
        if flags & END_STREAM:
            yield json.loads(payload or b"{}")
            return
        yield decode(payload, response_cls, codec)


def server_stream(
    client: httpx.Client,
    path: str,
    message: Message,
    response_cls: type[Message],
    codec: str = "json",
    headers: dict[str, str] | None = None,
) -> StreamResult:
    with stream_request(client, path, message, codec, headers) as response:
        assert response.status_code == 200, response.read()
        items = list(read_stream(response, response_cls, codec))
    assert isinstance(items[-1], dict), "stream ended without an end-stream message"
    return StreamResult(items[:-1], items[-1])


class ConnectFailure(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.code = body.get("code")
        self.message = body.get("message", "")
