"""File primitives wrenbox shares: data extents of sparse files, kernel-side copies, durable writes,
and publishing a file or directory atomically.

Guest RAM files, memory snapshots, disk images, images and templates all go through these, so holes are
found, copies are made, and things appear complete or not at all, one way everywhere.

Publishing: build under a temporary name beside the destination (:func:`temp_sibling`), then
:func:`publish` it. Whatever a crash leaves is a temporary whose name starts with :func:`temp_prefix`
(or the caller's own prefix), for a sweep at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from wrenbox.errors import AlreadyExists, PermissionDenied, StorageFull, Unsupported, WrenboxError

__all__ = [
    "clone_or_copy",
    "clone_range",
    "copy_range",
    "data_extents",
    "fsync_path",
    "fsync_tree",
    "no_space_is_storage_full",
    "private_dir",
    "publish",
    "remove_path",
    "temp_prefix",
    "temp_sibling",
    "write_at",
    "write_new",
]

log = logging.getLogger(__name__)

_MAX_COPY = 1 << 30  # copy_file_range moves at most ~2 GiB per call anyway
# copy_file_range cannot serve these pairs (another filesystem type, tmpfs on old kernels, ...): use sendfile.
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def temp_prefix(dest: Path) -> str:
    """Names of the temporaries made for ``dest`` start with this (``reclaim`` looks for it)."""
    return f".{dest.name}.tmp-"


def temp_sibling(dest: Path) -> Path:
    """A fresh temporary name next to ``dest``, to build it under before it appears."""
    return dest.parent / f"{temp_prefix(dest)}{secrets.token_hex(6)}"


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of ``fd`` below ``size`` that hold data; the rest are holes (read as zero).

    Filesystems without SEEK_DATA report the whole file as data, which is always correct, only slower.
    """
    extents: list[tuple[int, int]] = []
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after position
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here (block devices, ...)
                return [(0, size)] if size else []
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        position = end
    return extents


_FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_CLONE_RANGE = struct.Struct("<qQQQ")  # src_fd, src_offset, src_length, dest_offset
# The filesystem cannot share these blocks (no reflink support, another filesystem, unaligned range).
_NO_CLONE = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF, errno.EPERM}
_PIECE = 1 << 20  # small enough to stay in the CPU cache between hashing and writing


def clone_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> bool:
    """Share ``length`` bytes of ``src`` into ``dst`` (FICLONERANGE: XFS, btrfs); False where impossible."""
    try:
        fcntl.ioctl(dst, _FICLONERANGE, _CLONE_RANGE.pack(src, src_offset, length, dst_offset))
    except OSError as exc:
        if exc.errno in _NO_CLONE:
            return False
        raise
    return True


def write_at(
    fd: int, data: memoryview, offset: int, *, each: Callable[[memoryview], object] | None = None
) -> None:
    """Write ``data`` at ``offset`` in cache-sized pieces, handing each piece to ``each`` first (a hash).

    Measured here, writing from a mapping beats ``copy_file_range`` on ext4 (which splices page by page),
    and the piece a hash has just read is still in the cache when it is written.
    """
    for at in range(0, len(data), _PIECE):
        piece = data[at : at + _PIECE]
        if each is not None:
            each(piece)
        while piece:
            done = os.pwrite(fd, piece, offset + at)
            piece, at = piece[done:], at + done


def copy_range(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes between files inside the kernel (a reflink where the filesystem can)."""
    while length > 0:
        try:
            done = os.copy_file_range(src, dst, min(length, _MAX_COPY), src_offset, dst_offset)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            _send(src, dst, src_offset, dst_offset, length)
            return
        if done == 0:
            raise OSError(errno.EIO, f"source ended {length} bytes early at offset {src_offset}")
        src_offset, dst_offset, length = src_offset + done, dst_offset + done, length - done


def _send(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    os.lseek(dst, dst_offset, os.SEEK_SET)
    while length > 0:
        done = os.sendfile(dst, src, src_offset, min(length, _MAX_COPY))
        if done == 0:
            raise OSError(errno.EIO, f"source ended {length} bytes early at offset {src_offset}")
        src_offset, length = src_offset + done, length - done


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) holding exactly ``data``; nothing is left if that fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (the one directory fsync: after a rename or a create, fsync
    the parent so the new name survives a power cut)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (deepest first), then ``root`` itself."""
    for directory, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory, name))
        fsync_path(Path(directory))


def clone_or_copy(src: Path, dst: Path) -> None:
    """Create ``dst`` as an independent copy of ``src``: a reflink of the whole file where the filesystem
    can (XFS, btrfs), else a copy of its data extents inside the kernel, holes kept. ``dst`` must not
    exist; nothing is left of it if the copy fails."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if not _clone_whole(sfd, dfd):
                size = os.fstat(sfd).st_size
                os.ftruncate(dfd, size)
                for start, end in data_extents(sfd, size):
                    copy_range(sfd, dfd, start, start, end - start)
        except BaseException:
            os.close(dfd)
            dst.unlink(missing_ok=True)
            raise
        os.close(dfd)
    finally:
        os.close(sfd)


_FICLONE = 0x40049409  # _IOW(0x94, 9, int)


def _clone_whole(src: int, dst: int) -> bool:
    try:
        fcntl.ioctl(dst, _FICLONE, src)
    except OSError as exc:
        if exc.errno in _NO_CLONE:
            return False
        raise
    return True


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def publish(src: Path, dest: Path, *, replace: bool = False, durable: bool = True) -> None:
    """Put ``src`` (a complete file, directory or symlink, normally a :func:`temp_sibling` of ``dest``)
    at ``dest`` in one step: a reader sees the old ``dest`` (or none) or the whole new one, never a part.

    Without ``replace``, AlreadyExists if ``dest`` exists, and nothing changes (``RENAME_NOREPLACE``: no
    window in which a ``dest`` created meanwhile is overwritten). With ``replace``, an existing ``dest``
    is swapped out in the same step (``RENAME_EXCHANGE``, which works for non-empty directories) and
    removed afterwards; a reader that opened it keeps its open files.

    With ``durable``, everything under ``src`` is fsynced first and the parent directory after, so after a
    power cut ``dest`` is the new one, complete, or the old one.
    """
    if durable and src.is_dir() and not src.is_symlink():
        fsync_tree(src)
    elif durable:
        fsync_path(src)
    exchanged = replace and (dest.exists() or dest.is_symlink())
    try:
        _renameat2(src, dest, _RENAME_EXCHANGE if exchanged else _RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise AlreadyExists(f"{dest} already exists") from None
        if exc.errno == errno.EINVAL:
            raise Unsupported(f"the filesystem of {dest.parent} cannot rename atomically") from exc
        raise
    if durable:
        fsync_path(dest.parent)
    if exchanged:  # the old dest now sits at src
        try:
            remove_path(src)
        except OSError as exc:
            log.warning("could not remove %s, replaced by %s (a sweep will): %s", src, dest, exc)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def no_space_is_storage_full(where: Path, doing: str) -> Iterator[None]:
    """Report a full filesystem under ``where`` as :class:`StorageFull`, whoever hit it: this process
    (OSError ENOSPC or EDQUOT) or a program it ran (QEMU, qemu-img: an error quoting the errno's text).
    The caller must already throw away what it wrote; this only names the cause for the person who must
    free space."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        raise StorageFull(_full(where, doing, exc.strerror or "")) from exc
    except WrenboxError as exc:
        if isinstance(exc, StorageFull) or not any(os.strerror(e) in exc.message for e in _NO_SPACE):
            raise
        raise StorageFull(_full(where, doing, exc.message)) from exc


def _full(where: Path, doing: str, detail: str) -> str:
    return (
        f"{doing} failed: no space left on the filesystem of {where} ({detail}); free space there and retry"
    )


def remove_path(path: Path) -> None:
    """Remove a file, symlink or whole directory tree; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter (0700), created if missing. One that exists must
    be a real directory of ours: under a world-writable parent such as /dev/shm anyone could have made it
    first (and then swapped the files we put in it for links), so another owner or a symlink is refused."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionDenied(f"{path} is not a directory (a symlink or a file); refusing to use it")
    if st.st_uid != os.geteuid():
        raise PermissionDenied(
            f"{path} belongs to uid {st.st_uid}, not to wrenbox (uid {os.geteuid()}); someone else made it. "
            "Remove it, or choose another directory"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        path.chmod(0o700)
    return path
