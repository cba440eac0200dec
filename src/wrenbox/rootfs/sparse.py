"""Reading disk images the way they are stored: mostly holes.

Root filesystem images are sparse (a 5 GiB sandbox disk may hold 1 GiB of data), so everything here
visits only data extents (SEEK_DATA/SEEK_HOLE) and, within them, treats all-zero 64 KiB blocks like
holes. Two users: :func:`sparse_copy` (the copy backend, flattening block devices) and
:func:`content_digest` (base image fingerprints).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from wrenbox.errors import CorruptData
from wrenbox.fileio import data_extents

__all__ = ["BLOCK", "content_digest", "sparse_copy"]

# Holes are made (and zeros skipped) at this granularity: small enough to keep ext4 images sparse,
# large enough that per-block Python work stays far below the cost of the I/O.
BLOCK = 64 << 10
_CHUNK = 16 * BLOCK
_ZERO = bytes(BLOCK)
_HEADER = struct.Struct("<QQ")
_DIGEST_SCHEME = "sha256-blocks64k"


def data_ranges(fd: int, length: int) -> list[tuple[int, int]]:
    """Block-aligned, merged ranges covering every data extent of ``fd`` (all of it without hole support)."""
    ranges: list[tuple[int, int]] = []
    for start, end in data_extents(fd, length):
        start, aligned_end = start - start % BLOCK, min(-(-end // BLOCK) * BLOCK, length)
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], aligned_end)
        else:
            ranges.append((start, aligned_end))
    return ranges


def data_chunks(fd: int, length: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of everything that may hold data, in order; chunks start on the block grid."""
    for start, end in data_ranges(fd, length):
        offset = start
        while offset < end:
            data = os.pread(fd, min(_CHUNK, end - offset), offset)
            if not data:
                raise CorruptData(f"image shrank while being read (nothing at offset {offset})")
            yield offset, data
            offset += len(data)


def is_zero(data: bytes, start: int) -> bool:
    """Whether the block of ``data`` starting at ``start`` is all zeros."""
    block = data[start : start + BLOCK]
    return block == (_ZERO if len(block) == BLOCK else bytes(len(block)))


def sparse_copy(src: Path, dst: Path, size: int | None = None) -> int:
    """Copy ``src`` (file or block device) to the new file ``dst``, extended to ``size`` if larger.

    Only non-zero blocks are written, so ``dst`` is as sparse as its content allows. Returns the bytes
    written. FileExistsError if ``dst`` exists.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        length = os.lseek(sfd, 0, os.SEEK_END)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            written = sum(_write_nonzero(dfd, offset, data) for offset, data in data_chunks(sfd, length))
            os.ftruncate(dfd, max(length, size or 0))
            return written
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _write_nonzero(dfd: int, offset: int, data: bytes) -> int:
    view = memoryview(data)
    written = 0
    runs = itertools.groupby(range(0, len(data), BLOCK), key=lambda b: is_zero(data, b))
    for zero, blocks in runs:
        if zero:
            continue
        first, *rest = blocks
        run = view[first : (rest[-1] if rest else first) + BLOCK]
        position = offset + first
        while run:
            n = os.pwrite(dfd, run, position)
            run, position, written = run[n:], position + n, written + n
    return written


def content_digest(path: Path) -> str:
    """A digest of the bytes of ``path`` that costs time only for its non-zero data.

    ``sha256-blocks64k:<hex>``: SHA-256 over (offset, length, bytes) of every non-zero 64 KiB block in
    order, then the total size. Two files get the same digest exactly when their content is identical,
    however each is allocated (holes and written zeros are the same content).
    """
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        length = os.lseek(fd, 0, os.SEEK_END)
        for offset, data in data_chunks(fd, length):
            view = memoryview(data)
            for start in range(0, len(data), BLOCK):
                if not is_zero(data, start):
                    block = view[start : start + BLOCK]
                    digest.update(_HEADER.pack(offset + start, len(block)))
                    digest.update(block)
    finally:
        os.close(fd)
    digest.update(struct.pack("<Q", length))
    return f"{_DIGEST_SCHEME}:{digest.hexdigest()}"
