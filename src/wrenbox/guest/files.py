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

import contextlib
import ctypes
import errno
import os
import stat
import tempfile
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
    with _Spool(path) as spool:
        async for chunk in body:
            spool.write(chunk)
        spool.commit(user, metadata)
    return _written(path, metadata)


async def _upload_multipart(
    agent: Agent, request: Request, user: User, metadata: dict[str, str]
) -> list[dict[str, Any]]:
    parser = MultipartParser(boundary_of(request.headers.get("content-type", "")))
    query_path = request.query.get("path")
    spools: list[_Spool] = []
    current: _Spool | None = None
    with contextlib.ExitStack() as stack:
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
                    if any(spool.path == path for spool in spools):
                        raise InvalidArgument(f"{safe_text(path)!r} appears twice in one upload")
                    current = stack.enter_context(_Spool(path))
                    spools.append(current)
                elif isinstance(event, PartEnd):
                    current = None
                elif current is not None:
                    current.write(event)
        if not parser.done:
            raise InvalidArgument("the multipart body ended before its closing boundary")
        if not spools:
            raise InvalidArgument("the upload contained no part named 'file'")
        # Only now, with every part complete, does any target change.
        for spool in spools:
            spool.commit(user, metadata)
    return [_written(spool.path, metadata) for spool in spools]


def _written(path: str, metadata: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": safe_text(os.path.basename(path)),
        "type": "file",
        "path": safe_text(path),
    }
    if metadata:
        entry["metadata"] = metadata
    return entry


class _Spool:
    """One uploaded file's content, held aside until the whole request body has arrived, then written
    into its target in place.

    Bad or failed input changes nothing: a body that stalls, breaks off or turns out malformed must not
    have truncated the target (or, in a multipart upload, written the earlier parts). Writing beside the
    target and renaming over it would show watchers a rename where envd shows a create and a write (the
    SDKs' tests check those events), and would replace the file's inode, owner and mode. So the body goes
    into an unnamed file (``O_TMPFILE``: invisible to watchers, freed by the kernel however the request
    ends) in the target's nearest existing directory, on the same filesystem so the copy stays in the
    kernel; then :meth:`commit` writes it into the target like an ordinary write would.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = 0
        existing, self._missing = _missing_parents(path)  # checked now: a bad path fails before the body
        self._fd = _unnamed_file(existing, path)

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            raise _write_error(err, self.path) from None
        self.size += len(data)

    def commit(self, user: User, metadata: dict[str, str]) -> None:
        """Write the content into the target in place, owned by ``user``, with exactly ``metadata``.

        Watchers see what envd's writes show: a new file is created, handed to its user (chmod) and
        written; an existing one is written (one burst: reserve, copy and shrink are all IN_MODIFY).
        """
        fd, created = -1, False
        try:
            ensure_parent_dirs(self.path, user)
            fd, created = _open_target(self.path)
            before = _require_regular(fd, self.path)
            os.set_blocking(fd, True)
            chown_to(self.path, user)  # before the data, as envd: create, chmod, write
            try:
                _fill(fd, self._fd, self.size, before.st_size)
            except OSError:
                with contextlib.suppress(OSError):  # no room: the file goes back to its owner
                    os.fchown(fd, before.st_uid, before.st_gid)
                raise
            # Last, as before: a metadata write is a chmod event, which comes after the write.
            _set_metadata(fd, self.path, metadata)
        except BaseException as err:
            self._remove_created(created)
            if isinstance(err, OSError):
                raise _write_error(err, self.path) from None
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _remove_created(self, target: bool) -> None:
        """Undo what a failed commit created: the target if ``target``, and its new (still empty) parents."""
        if target:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for directory in self._missing:  # nearest first
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def _missing_parents(path: str) -> tuple[str, list[str]]:
    """The nearest existing directory above ``path``, and the missing ones below it (nearest first)."""
    missing: list[str] = []
    probe = os.path.dirname(path) or "/"
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            missing.append(probe)
            probe = os.path.dirname(probe)  # "/" always exists: this ends
            continue
        except OSError as err:
            raise error_from_os(err, probe) from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{safe_text(probe)!r} exists and is not a directory")
        return probe, missing


# O_TMPFILE is not supported there (EISDIR: kernels before 3.11), or the agent may not create files in
# that directory although it may write the target itself: spool in the agent's temporary directory.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EACCES, errno.EPERM}


def _unnamed_file(directory: str, path: str) -> int:
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno not in _NO_TMPFILE:
            raise _write_error(err, path) from None
    try:
        with tempfile.TemporaryFile() as spool:  # itself O_TMPFILE where it can, else unlinked at once
            return os.dup(spool.fileno())
    except OSError as err:
        raise _write_error(err, path) from None


def _open_target(path: str) -> tuple[int, bool]:
    """``path`` opened for writing, not truncated; True if this call created it."""
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not hang us
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
    except FileExistsError:
        return os.open(path, flags | os.O_CREAT, 0o666), False  # O_CREAT: a symlink to a new file


FALLOC_FL_KEEP_SIZE = 0x01
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fill(fd: int, spool: int, size: int, old_size: int) -> None:
    """Make ``fd``'s content the first ``size`` bytes of ``spool``.

    The room is reserved first, so a full disk fails before a byte of the target changes. With
    KEEP_SIZE, the reservation alone changes neither size nor content; posix_fallocate would grow the
    file (and glibc's emulation writes zeros). A file with content is shrunk only after the copy, and an
    empty one is never truncated: that would be a write event envd does not send.
    """
    if size and _libc.fallocate64(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL, errno.ENOSYS):  # no fallocate there
            raise OSError(err, os.strerror(err))
    _copy_in(spool, fd, size)
    if old_size > size:
        os.ftruncate(fd, size)


def _copy_in(spool: int, fd: int, size: int) -> None:
    """The spool's first ``size`` bytes into ``fd`` from its start, inside the kernel: sendfile works
    within a filesystem and across two (the spool may have fallen back to the agent's temp dir)."""
    offset = 0
    while offset < size:
        done = os.sendfile(fd, spool, offset, size - offset)
        if done == 0:
            raise OSError(errno.EIO, f"the upload's spool ended {size - offset} bytes early")
        offset += done


def _set_metadata(fd: int, path: str, metadata: dict[str, str]) -> None:
    """The file's metadata becomes exactly ``metadata``: what an earlier upload left is dropped."""
    try:
        for name in os.listxattr(fd):
            if name.startswith(METADATA_XATTR):
                os.removexattr(fd, name)
        for key, value in metadata.items():
            os.setxattr(fd, METADATA_XATTR + key, value.encode())
    except OSError as err:
        raise InvalidArgument(f"cannot store metadata on {safe_text(path)!r}: {err.strerror}") from None


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
    if not inflater.eof:  # a cut-off stream inflates without error: only its missing end tells
        raise InvalidArgument("body is not valid gzip: the stream ends before its end marker")
