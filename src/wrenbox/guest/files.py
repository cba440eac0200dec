"""``GET /files`` (download) and ``POST /files`` (upload), streamed in both directions.

Query: ``path`` (the file), ``username`` (act as this user; default: the sandbox's default user), and
for signed URLs ``signature``/``signature_expiration`` (checked in :mod:`.app`). Uploads are either
``application/octet-stream`` (the body is the file, ``path`` required, optional ``Content-Encoding:
gzip``) or ``multipart/form-data`` with one or more parts named ``file`` whose filename is the target
path (or ``path`` from the query). Parent directories are created and owned by the acting user.
Answers: 200 with ``[{"name", "type": "file", "path"}]``; 400 bad path or a directory, 401 unknown
user, 404 missing file, 507 no space left. Downloads are gzip-compressed only when the request sends
``Accept-Encoding: gzip`` alone.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from wrenbox.errors import InvalidArgument, NotFound, WrenboxError

from .agent import Agent
from .asgi import Request, Send, send_error, send_json
from .multipart import MultipartParser, PartEnd, PartStart, boundary_of
from .paths import chown_to, ensure_parent_dirs, error_from_os, resolve, safe_text
from .users import User

__all__ = ["download", "upload"]

CHUNK = 256 * 1024
METADATA_HEADER = "x-metadata-"
METADATA_XATTR = "user.e2b."


class InsufficientStorage(WrenboxError):
    code = "resource_exhausted"
    http_status = 507


async def download(agent: Agent, request: Request, send: Send) -> None:
    try:
        user = agent.user_for(request.query.get("username"))
        path = resolve(request.query.get("path", ""), user, agent.default_workdir)
        fd = _open_for_reading(path)
    except WrenboxError as err:
        await send_error(send, err)
        return
    try:
        size = os.fstat(fd).st_size
        gzip = _accepts_gzip(request.headers.get("accept-encoding", ""))
        name = quote(os.path.basename(path).encode("utf-8", "surrogateescape"))
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-disposition", f"attachment; filename*=UTF-8''{name}".encode()),
            (b"vary", b"Accept-Encoding"),
        ]
        # Files that report size 0 (procfs, sysfs) may still have content: send those chunked.
        limit = None if gzip or size == 0 else size
        if gzip:
            headers.append((b"content-encoding", b"gzip"))
        if limit is not None:
            headers.append((b"content-length", str(limit).encode()))
        chunks = _file_chunks(fd, gzip, limit)
        try:
            # Read before answering: a file that cannot be read at all gets an error status, not a
            # 200 whose connection is then cut.
            first = await anext(chunks, b"")
        except OSError as err:
            await send_error(send, _file_error(err, path))
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        os.close(fd)


async def upload(agent: Agent, request: Request, send: Send) -> None:
    try:
        user = agent.user_for(request.query.get("username"))
        metadata = _metadata(request.headers)
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type == "application/octet-stream":
            written = [await _upload_raw(agent, request, user, metadata)]
        elif media_type.startswith("multipart/"):
            written = await _upload_multipart(agent, request, user, metadata)
        else:
            raise InvalidArgument(
                f"unsupported content type {media_type!r}: "
                "use multipart/form-data or application/octet-stream"
            )
    except WrenboxError as err:
        await send_error(send, err)
        return
    await send_json(send, 200, written)


def _open_for_reading(path: str) -> int:
    # O_NONBLOCK: opening a FIFO must not hang the agent; it is refused below like any non-file.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise error_from_os(err, path) from None
    try:
        _require_regular(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_regular(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    mode = st.st_mode & 0o170000
    if mode == 0o040000:
        raise InvalidArgument(f"path {safe_text(path)!r} is a directory")
    if mode != 0o100000:
        raise InvalidArgument(f"path {safe_text(path)!r} is not a regular file")
    return st


async def _file_chunks(fd: int, gzip: bool, limit: int | None) -> AsyncIterator[bytes]:
    """The file's bytes; with ``limit`` exactly that many at most (the Content-Length we promised)."""
    compressor = None
    if gzip:
        import zlib

        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # speed over ratio
    remaining = limit
    while remaining is None or remaining > 0:
        chunk = os.read(fd, CHUNK if remaining is None else min(CHUNK, remaining))
        if not chunk:
            break
        if remaining is not None:
            remaining -= len(chunk)
        if compressor is None:
            yield chunk
        elif packed := compressor.compress(chunk):
            yield packed
    if compressor is not None:
        yield compressor.flush()


KERNEL_FILES = ("/proc/", "/sys/")


def _file_error(err: OSError, path: str) -> WrenboxError:
    """``error_from_os``, but a kernel interface file (/proc/self/mem, a sysfs attribute) that refuses
    to be read or written as a plain file (EIO, ...) is the client's error; elsewhere EIO is the disk's."""
    wrapped = error_from_os(err, path)
    if type(wrapped) is WrenboxError and os.path.realpath(path).startswith(KERNEL_FILES):
        return InvalidArgument(f"{safe_text(path)!r} cannot be used as a plain file: {err.strerror}")
    return wrapped


def _accepts_gzip(accept_encoding: str) -> bool:
    """Compress only when gzip is asked for alone (the SDK's ``read(gzip=True)``).

    HTTP clients offer "gzip, deflate" by default; between host and guest the link is local, and
    compressing every download would cost the guest far more CPU than it saves.
    """
    codings = [item.split(";", 1)[0].strip().lower() for item in accept_encoding.split(",") if item.strip()]
    return codings == ["gzip"]


async def _upload_raw(agent: Agent, request: Request, user: User, metadata: dict[str, str]) -> dict[str, Any]:
    raw_path = request.query.get("path")
    if not raw_path:
        raise InvalidArgument("the path query parameter is required for an octet-stream upload")
    path = resolve(raw_path, user, agent.default_workdir)
    body = request.body_chunks()
    if request.headers.get("content-encoding", "").strip().lower() == "gzip":
        body = _gunzip(body)
    with _TargetFile(path, user) as target:
        async for chunk in body:
            target.write(chunk)
        target.set_metadata(metadata)
    return _written(path, metadata)


async def _upload_multipart(
    agent: Agent, request: Request, user: User, metadata: dict[str, str]
) -> list[dict[str, Any]]:
    parser = MultipartParser(boundary_of(request.headers.get("content-type", "")))
    query_path = request.query.get("path")
    written: list[dict[str, Any]] = []
    target: _TargetFile | None = None
    try:
        async for chunk in request.body_chunks():
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    if event.name != "file":
                        continue
                    raw_path = query_path or event.filename
                    if not raw_path:
                        raise InvalidArgument(
                            "a file part needs a filename (its path) or the path query parameter"
                        )
                    path = resolve(raw_path, user, agent.default_workdir)
                    if any(entry["path"] == path for entry in written):
                        raise InvalidArgument(f"{safe_text(path)!r} appears twice in one upload")
                    target = _TargetFile(path, user).__enter__()
                elif isinstance(event, PartEnd):
                    if target is not None:
                        target.set_metadata(metadata)
                        target.__exit__(None, None, None)
                        written.append(_written(target.path, metadata))
                        target = None
                elif target is not None:
                    target.write(event)
    finally:
        if target is not None:
            target.__exit__(None, None, None)
    if not parser.done:
        raise InvalidArgument("the multipart body ended before its closing boundary")
    if not written:
        raise InvalidArgument("the upload contained no part named 'file'")
    return written


def _written(path: str, metadata: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": safe_text(os.path.basename(path)),
        "type": "file",
        "path": safe_text(path),
    }
    if metadata:
        entry["metadata"] = metadata
    return entry


class _TargetFile:
    """A file being uploaded: parents created, truncated, owned by the user, written as data arrives."""

    def __init__(self, path: str, user: User) -> None:
        self.path = path
        self._user = user
        self._fd = -1

    def __enter__(self) -> _TargetFile:
        ensure_parent_dirs(self.path, self._user)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not hang us
            self._fd = os.open(self.path, flags, 0o666)
            if _require_regular(self._fd, self.path).st_size:
                # Only a file with content: truncating an empty one is still a modification event
                # for watchers, and envd's writes report a new file as create, chmod, write only.
                os.ftruncate(self._fd, 0)
            os.set_blocking(self._fd, True)
        except BaseException as err:
            self.__exit__()
            if isinstance(err, OSError):
                raise _write_error(err, self.path) from None
            raise
        chown_to(self.path, self._user)
        return self

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            raise _write_error(err, self.path) from None

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """The file's metadata becomes exactly ``metadata``: what an earlier upload left is dropped."""
        try:
            for name in os.listxattr(self._fd):
                if name.startswith(METADATA_XATTR):
                    os.removexattr(self._fd, name)
            for key, value in metadata.items():
                os.setxattr(self._fd, METADATA_XATTR + key, value.encode())
        except OSError as err:
            raise InvalidArgument(
                f"cannot store metadata on {safe_text(self.path)!r}: {err.strerror}"
            ) from None

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_error(err: OSError, path: str) -> WrenboxError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(f"not enough disk space to write {safe_text(path)!r}")
    if err.errno == errno.EISDIR:
        return InvalidArgument(f"path {safe_text(path)!r} is a directory")
    if err.errno == errno.ENOENT:
        return NotFound(f"parent directory of {safe_text(path)!r} does not exist")
    return _file_error(err, path)


def _metadata(headers: dict[str, str]) -> dict[str, str]:
    return {k[len(METADATA_HEADER) :]: v for k, v in headers.items() if k.startswith(METADATA_HEADER)}


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    import zlib

    inflater = zlib.decompressobj(47)  # gzip or zlib header, detected
    async for chunk in chunks:
        data = chunk
        while data:
            try:
                out = inflater.decompress(data, CHUNK)
            except zlib.error as err:
                raise InvalidArgument(f"body is not valid gzip: {err}") from None
            if out:
                yield out
            data = inflater.unconsumed_tail
    tail = inflater.flush()
    if tail:
        yield tail
