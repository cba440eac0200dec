"""What the host accepts from a guest agent: how many bytes, how fast, and what text.

The guest is root in a VM running code nobody vouched for, and it may replace its agent. Everything the
agent answers is therefore read raw (never decompressed by httpx: a few KiB of stacked gzip inflate to
GiBs in the manager, the one process every tenant shares), into a buffer that stops at a cap near what a
real agent sends; big protobuf messages are counted before they are decoded and decoded off the event
loop; transfers must keep moving (:class:`Pace`); and text the guest chose (error messages) is cut short
and stripped of control characters before it reaches logs or API callers.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Final, Self

import anyio
import httpx

from wrenbox.errors import GuestError, Timeout

__all__ = [
    "MAX_ERROR_BODY",
    "MAX_FIELDS",
    "MAX_MESSAGE",
    "MAX_TEXT",
    "MAX_UNARY",
    "OFFLOAD_DECODE",
    "Pace",
    "check_identity",
    "clean_text",
    "count_fields",
    "read_body",
]

MAX_ERROR_BODY: Final = 64 * 1024
"""An error answer or a small JSON document (``/health``, ``/init``, ``/metrics``, ``/envs``)."""
MAX_UNARY: Final = 8 * 1024 * 1024
"""A unary Connect answer; the biggest real one is a deep ``ListDir`` (≈ 150 bytes per entry)."""
MAX_MESSAGE: Final = 1024 * 1024
"""One message of a stream: the agent sends output in chunks of at most 32 KiB."""
MAX_FIELDS: Final = 100_000
"""Top-level fields in one protobuf message (a listing's entries): decoding costs ≈ 150 times the wire size
in Python objects when every field is tiny, so the count is capped before decoding."""
OFFLOAD_DECODE: Final = 256 * 1024
"""Messages at least this big are decoded in a worker thread, so the event loop serves other tenants."""
MAX_TEXT: Final = 1024
"""Guest-chosen text (error messages) kept for logs and callers."""

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    """Guest text made safe to log and show: control characters (terminal escapes included) replaced,
    cut to ``limit`` characters."""
    cleaned = _CONTROL.sub("?", text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "…"


def check_identity(response: httpx.Response, what: str) -> None:
    """Refuse a body in any encoding but identity: the host asks for none, so one is an attack (or a
    broken agent), and httpx would otherwise inflate it for us."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise GuestError(
            f"{what}: the agent sent a {clean_text(encoding, 40)!r}-encoded body, which was not asked for"
        )


async def read_body(response: httpx.Response, limit: int, what: str) -> bytes:
    """The raw body of a streamed ``response``, refused once it passes ``limit`` bytes."""
    check_identity(response, what)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise GuestError(f"{what}: the agent announced {int(declared)} bytes (at most {limit} accepted)")
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise GuestError(f"{what}: the agent sent more than {limit} bytes")
    return bytes(body)


def count_fields(data: bytes, limit: int = MAX_FIELDS) -> int:
    """The number of top-level fields in protobuf wire ``data``, refused past ``limit``; a cheap scan that
    bounds what decoding will build. Malformed data is left for the decoder to reject."""
    count, i, end = 0, 0, len(data)
    while i < end:
        tag, i = _varint(data, i)
        wire = tag & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _varint(data, i)
            i += size
        elif wire == 5:
            i += 4
        else:
            return count  # groups (3, 4) are not used by the agent's messages; the decoder decides
        count += 1
        if count > limit:
            raise GuestError(f"the agent sent a message with more than {limit} fields")
    return count


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data) and shift < 70:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    return value, len(data)


class Pace:
    """A transfer's deadline that moves with its progress: the transfer may take ``grace`` seconds plus
    one second per ``min_rate`` bytes moved. A peer that trickles (one byte every few seconds, forever)
    runs out of time; a big transfer that keeps moving never does.

    ``with Pace(...) as pace:`` around the transfer, :meth:`moved` after each chunk.
    """

    def __init__(self, what: str, *, grace: float, min_rate: float) -> None:
        self.what = what
        self.grace = grace
        self.min_rate = min_rate
        self.bytes = 0
        self._scope = anyio.CancelScope()
        self._start = 0.0

    def __enter__(self) -> Self:
        self._start = anyio.current_time()
        self._scope.deadline = self._start + self.grace
        self._scope.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        swallowed = self._scope.__exit__(exc_type, exc, tb)
        if self._scope.cancelled_caught and self._scope.deadline <= anyio.current_time():
            raise Timeout(
                f"{self.what}: too slow ({self.bytes} bytes in {anyio.current_time() - self._start:.0f} s; "
                f"at least {self.min_rate:.0f} bytes/s after the first {self.grace:g} s)"
            )
        return bool(swallowed)

    def moved(self, count: int) -> None:
        self.bytes += count
        self._scope.deadline = self._start + self.grace + self.bytes / self.min_rate
