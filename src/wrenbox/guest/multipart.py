"""A streaming ``multipart/form-data`` parser: parts are handed on chunk by chunk, never buffered whole.

Feed it the body as it arrives; it yields :class:`PartStart` (with the part's headers), ``bytes`` of
the part's content, and :class:`PartEnd`. Memory use is bounded by one chunk plus the boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from wrenbox.errors import InvalidArgument

__all__ = ["MultipartParser", "PartEnd", "PartStart", "boundary_of"]

MAX_HEADER_BYTES = 16 * 1024

_PARAM = re.compile(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_HTML5_ESCAPE = re.compile(r"%(22|[01][0-9A-Fa-f])")


@dataclass(frozen=True, slots=True)
class PartStart:
    name: str | None
    filename: str | None


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


def boundary_of(content_type: str) -> bytes:
    params = _params(content_type)
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise InvalidArgument("multipart body without a valid boundary")
    return boundary.encode("latin-1")


class MultipartParser:
    def __init__(self, boundary: bytes) -> None:
        # Every boundary but the first is preceded by CRLF; a leading CRLF lets one search find all.
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")
        self._state = "preamble"

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, chunk: bytes) -> Iterator[PartStart | PartEnd | bytes]:
        self._buffer += chunk
        while True:
            if self._state == "preamble":
                if not self._skip_to_delimiter():
                    return
            elif self._state == "delimiter":
                if len(self._buffer) < 2:
                    return
                marker = bytes(self._buffer[:2])
                del self._buffer[:2]
                if marker == b"--":
                    self._state = "done"
                elif marker == b"\r\n":
                    self._state = "headers"
                else:
                    raise InvalidArgument("malformed multipart body (bad boundary line)")
            elif self._state == "headers":
                # A part without headers starts straight with the blank line.
                if self._buffer.startswith(b"\r\n"):
                    end, skip = 0, 2
                else:
                    end, skip = self._buffer.find(b"\r\n\r\n"), 4
                if end < 0:
                    if len(self._buffer) > MAX_HEADER_BYTES:
                        raise InvalidArgument("multipart part headers are too large")
                    return
                headers = bytes(self._buffer[:end])
                del self._buffer[: end + skip]
                self._state = "body"
                yield _part_start(headers)
            elif self._state == "body":
                end = self._buffer.find(self._delimiter)
                if end < 0:
                    keep = len(self._delimiter) - 1
                    if len(self._buffer) > keep:
                        data = bytes(self._buffer[:-keep])
                        del self._buffer[:-keep]
                        yield data
                    return
                if end:
                    yield bytes(self._buffer[:end])
                del self._buffer[: end + len(self._delimiter)]
                self._state = "delimiter"
                yield PartEnd()
            else:  # done: the epilogue is ignored
                self._buffer.clear()
                return

    def _skip_to_delimiter(self) -> bool:
        start = self._buffer.find(self._delimiter)
        if start < 0:
            del self._buffer[: max(0, len(self._buffer) - len(self._delimiter))]
            return False
        del self._buffer[: start + len(self._delimiter)]
        self._state = "delimiter"
        return True


def _part_start(raw: bytes) -> PartStart:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("multipart part headers are not UTF-8") from None
    for line in text.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            params = _params(value)
            filename = params.get("filename*") or params.get("filename")
            return PartStart(params.get("name"), filename)
    return PartStart(None, None)


def _params(header: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(header):
        value = raw.strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
            # HTML5 form encoding (what httpx and browsers send): '"' and control characters as %XX.
            value = _HTML5_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value)
        if key.lower() == "filename*":
            value = _rfc5987(value)
        params[key.lower()] = value
    return params


def _rfc5987(value: str) -> str:
    from urllib.parse import unquote

    charset, _, rest = value.partition("'")
    _, _, encoded = rest.partition("'")
    return unquote(encoded, encoding=charset or "utf-8", errors="strict") if encoded else value
