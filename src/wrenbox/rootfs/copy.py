"""The fallback backend: every disk is a full sparse copy of its base image. Works on any filesystem.

:func:`sparse_copy` is also how the other backends write flattened images from block devices: it
copies only data extents (SEEK_DATA/SEEK_HOLE) and, within them, skips all-zero blocks, so the output
is as sparse as the content allows.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from pathlib import Path

from wrenbox.errors import CorruptData
from wrenbox.rootfs.base import Disk
from wrenbox.rootfs.filedisk import FileDiskBackend

__all__ = ["CopyBackend", "sparse_copy"]

_CHUNK = 1 << 20
# Holes are made at this granularity: small enough to keep ext4 images sparse, large enough that the
# per-block Python work stays far below the cost of the copy itself.
_BLOCK = 64 << 10
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_BLOCK = bytes(_BLOCK)


def sparse_copy(src: Path, dst: Path, size: int | None = None) -> int:
    """Copy ``src`` (file or block device) to the new file ``dst``, extended to ``size`` if larger.

    Returns the bytes actually written. ``dst`` must not exist.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        length = os.lseek(sfd, 0, os.SEEK_END)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            written = sum(_copy_range(sfd, dfd, start, end) for start, end in _data_extents(sfd, length))
            os.ftruncate(dfd, max(length, size or 0))
            return written
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _data_extents(fd: int, length: int) -> list[tuple[int, int]]:
    extents = []
    pos = 0
    while pos < length:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all of it is data
                return [(pos, length)]
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
        extents.append((start, end))
        pos = end
    return extents


def _copy_range(sfd: int, dfd: int, start: int, end: int) -> int:
    written = 0
    offset = start
    while offset < end:
        data = os.pread(sfd, min(_CHUNK, end - offset), offset)
        if not data:
            raise CorruptData(f"source shrank while being copied (no data at offset {offset})")
        if data != (_ZERO_CHUNK if len(data) == _CHUNK else bytes(len(data))):
            written += _write_nonzero(dfd, data, offset)
        offset += len(data)
    return written


def _write_nonzero(dfd: int, data: bytes, offset: int) -> int:
    """Write the runs of non-zero blocks of ``data`` (which belongs at ``offset``), leaving holes."""
    view = memoryview(data)
    written = 0
    runs = itertools.groupby(range(0, len(data), _BLOCK), key=lambda b: _is_zero(data, b))
    for is_zero, blocks in runs:
        if is_zero:
            continue
        first, *rest = blocks
        chunk = view[first : (rest[-1] if rest else first) + _BLOCK]
        _pwrite_all(dfd, chunk, offset + first)
        written += len(chunk)
    return written


def _is_zero(data: bytes, start: int) -> bool:
    block = data[start : start + _BLOCK]
    return block == (_ZERO_BLOCK if len(block) == _BLOCK else bytes(len(block)))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class CopyBackend(FileDiskBackend):
    """Disks are independent sparse copies: slow to create, but no filesystem or VMM requirements."""

    name = "copy"
    suffix = ".copy.raw"

    async def _make(self, disk: Disk) -> None:
        await asyncio.to_thread(sparse_copy, disk.base.path, disk.store, disk.size)

    async def _flatten_into(self, disk: Disk, out: Path) -> None:
        await asyncio.to_thread(sparse_copy, disk.store, out, disk.size)
