"""A streamed ``multipart/form-data`` body carrying one file, for ``POST /files``.

httpx builds multipart bodies only from in-memory data or synchronous file objects (read with
blocking calls on the event loop); this writes the few framing lines itself around any async source
of chunks, so an upload of any size holds one chunk in memory at a time.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterable, AsyncIterator

import anyio

__all__ = ["CHUNK_SIZE", "MultipartFile", "file_chunks"]

CHUNK_SIZE = 1024 * 1024


async def file_chunks(file: anyio.AsyncFile[bytes], chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The rest of an open local file, read in a worker thread one chunk at a time."""
    while chunk := await file.read(chunk_size):
        yield chunk


class MultipartFile:
    """One form part named ``file`` whose content comes from ``chunks``."""

    def __init__(self, filename: str, chunks: AsyncIterable[bytes]) -> None:
        self.boundary = secrets.token_hex(16)
        # RFC 7578 / WHATWG: percent-escape what would break the quoted filename.
        quoted = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        self._head = (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._chunks = chunks

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._head
        async for chunk in self._chunks:
            if chunk:
                yield bytes(chunk)
        yield self._tail
