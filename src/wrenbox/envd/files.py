"""Files in the guest: streamed upload and download (``/files``), and the filesystem service."""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx

from wrenbox.envd.channel import Channel
from wrenbox.envd.connect import Rpc, error_for_response, translate_errors
from wrenbox.envd.limits import MAX_ERROR_BODY, Pace, check_identity, clean_text, read_body
from wrenbox.envd.models import EntryInfo, WriteInfo
from wrenbox.envd.streams import WatchStream
from wrenbox.errors import AlreadyExists, GuestError, InvalidArgument, NotFound, Unavailable
from wrenbox.proto.filesystem import filesystem_pb as fs

__all__ = ["CHUNK_SIZE", "AsyncFiles", "UploadData"]

CHUNK_SIZE = 1024 * 1024
UploadData = bytes | Path | AsyncIterable[bytes]
"""What can be uploaded: bytes, a local file, or an async iterable of chunks."""

_STAT = Rpc("/filesystem.Filesystem/Stat", fs.StatResponse)
_MAKE_DIR = Rpc("/filesystem.Filesystem/MakeDir", fs.MakeDirResponse)
_MOVE = Rpc("/filesystem.Filesystem/Move", fs.MoveResponse)
_LIST_DIR = Rpc("/filesystem.Filesystem/ListDir", fs.ListDirResponse)
_REMOVE = Rpc("/filesystem.Filesystem/Remove", fs.RemoveResponse)
_WATCH_DIR = Rpc("/filesystem.Filesystem/WatchDir", fs.WatchDirResponse)


class AsyncFiles:
    """``client.files``: file contents and the guest's file tree."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def upload(self, path: str, data: UploadData, *, user: str | None = None) -> WriteInfo:
        """Write a file in the guest (parents created, an existing file replaced), streaming ``data``."""
        if isinstance(data, Path):
            try:
                local = await anyio.open_file(data, "rb")
            except OSError as exc:
                raise InvalidArgument(f"cannot read local file {str(data)!r}: {exc.strerror}") from exc
            async with local:
                return await self.upload(path, file_chunks(local), user=user)
        # One file per request as a raw octet-stream body: unlike multipart, the agent has nothing to
        # parse (and parsing in Python costs ten times more in a TCG guest).
        body = _once(bytes(data)) if isinstance(data, bytes | bytearray | memoryview) else data
        what = f"upload to {path!r}"
        with self._pace(what) as pace:
            answer = await self._channel.request(
                "POST",
                "/files",
                timeout=math.inf,  # the pace is the deadline
                params=self._channel.file_params(path, user),
                content=_counted(_non_empty(body), pace),
                headers={"Content-Type": "application/octet-stream"},
                extensions={"timeout": self._channel.transfer_timeout.as_dict()},
            )
        try:
            return WriteInfo.from_json(answer.json(what)[0])
        except (GuestError, ValueError, LookupError, AttributeError, TypeError) as exc:
            raise GuestError(
                f"{what}: unexpected answer {clean_text(answer.body[:200].decode(errors='replace'))!r}"
            ) from exc

    @asynccontextmanager
    async def download(self, path: str, *, user: str | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        """``async with files.download(path) as chunks: async for chunk in chunks: ...`` — the file
        streams; leaving the block early abandons the transfer."""
        what = f"download of {path!r}"
        http = self._channel.http
        params = self._channel.file_params(path, user)
        request = http.build_request("GET", "/files", params=params, timeout=self._channel.transfer_timeout)
        with self._pace(what) as pace:
            with translate_errors(what):
                response = await http.send(request, stream=True)
            try:
                if response.status_code != 200:
                    with translate_errors(what):
                        body = await read_body(response, MAX_ERROR_BODY, what)
                    raise error_for_response(response.status_code, body, what)
                check_identity(response, what)  # a download is the file's bytes, never inflated here
                yield _body_chunks(response, what, pace)
            finally:
                await response.aclose()

    def _pace(self, what: str) -> Pace:
        config = self._channel.config
        return Pace(what, grace=config.request_timeout or math.inf, min_rate=config.min_transfer_rate)

    async def download_to(self, path: str, dest: Path, *, user: str | None = None) -> int:
        """Download a file into local ``dest`` and return its size. It is written as ``dest.part``
        and renamed when complete, so a failed download leaves no partial ``dest``."""
        partial = dest.with_name(dest.name + ".part")
        size = 0
        pending = bytearray()  # network chunks are small; a worker-thread hop per write is not
        try:
            async with self.download(path, user=user) as chunks, await anyio.open_file(partial, "wb") as out:
                async for chunk in chunks:
                    pending += chunk
                    if len(pending) >= CHUNK_SIZE:
                        await out.write(pending)
                        size += len(pending)
                        pending.clear()
                await out.write(pending)
                size += len(pending)
            await anyio.Path(partial).rename(dest)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.Path(partial).unlink(missing_ok=True)
            raise
        return size

    async def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        response = await self._channel.unary(_STAT, fs.StatRequest(path=path), user)
        return _entry(response.entry, path)

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            await self.stat(path, user=user)
        except NotFound:
            return False
        return True

    async def list_dir(self, path: str, *, depth: int = 1, user: str | None = None) -> list[EntryInfo]:
        """Entries under ``path``, descending ``depth`` levels (1: the directory's own entries)."""
        if depth < 1:
            raise InvalidArgument(f"depth must be >= 1, got {depth}")
        response = await self._channel.unary(_LIST_DIR, fs.ListDirRequest(path=path, depth=depth), user)
        return [EntryInfo.from_pb(entry) for entry in response.entries]

    async def make_dir(self, path: str, *, exist_ok: bool = False, user: str | None = None) -> EntryInfo:
        """Create a directory and its missing parents; :class:`AlreadyExists` unless ``exist_ok``."""
        try:
            response = await self._channel.unary(_MAKE_DIR, fs.MakeDirRequest(path=path), user)
        except AlreadyExists:
            if not exist_ok:
                raise
            return await self.stat(path, user=user)
        return _entry(response.entry, path)

    async def move(self, source: str, destination: str, *, user: str | None = None) -> EntryInfo:
        request = fs.MoveRequest(source=source, destination=destination)
        response = await self._channel.unary(_MOVE, request, user)
        return _entry(response.entry, destination)

    async def remove(self, path: str, *, user: str | None = None) -> None:
        """Remove a file, or a directory with everything in it."""
        await self._channel.unary(_REMOVE, fs.RemoveRequest(path=path), user)

    def watch(self, path: str, *, recursive: bool = False, user: str | None = None) -> WatchStream:
        """``async with files.watch(dir) as events: async for event in events`` — every change after
        the block was entered is reported."""
        request = fs.WatchDirRequest(path=path, recursive=recursive)
        opener = self._channel.stream_opener(_WATCH_DIR, request, user)
        return WatchStream(opener, self._channel.config.request_timeout)


def _entry(entry: fs.EntryInfo | None, path: str) -> EntryInfo:
    if entry is None:
        raise Unavailable(f"the agent returned no entry for {path!r}")
    return EntryInfo.from_pb(entry)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _non_empty(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    # An empty chunk would end a chunked HTTP/1.1 body early.
    async for chunk in chunks:
        if chunk:
            yield bytes(chunk)


async def file_chunks(file: anyio.AsyncFile[bytes], chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The rest of an open local file, read in a worker thread one chunk at a time."""
    while chunk := await file.read(chunk_size):
        yield chunk


async def _counted(chunks: AsyncIterable[bytes], pace: Pace) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield chunk
        pace.moved(len(chunk))


async def _body_chunks(response: httpx.Response, what: str, pace: Pace) -> AsyncIterator[bytes]:
    chunks = response.aiter_raw()
    while True:
        with translate_errors(what):
            chunk = await anext(chunks, None)
        if chunk is None:
            return
        pace.moved(len(chunk))
        yield chunk
