"""Writing one build's diff file: runs appended in address order, checksummed on the way.

Blocks are shared with the source (``FICLONERANGE``) where the filesystem can (XFS, btrfs), else written
from the source's mapping in cache-sized pieces, each hashed just before it is written. (Handing the
writes to a worker thread, so they overlap the scan, measured no faster on this shared 2-core machine.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from uuid import UUID

import xxhash

from wrenbox.fileio import clone_range, write_at
from wrenbox.memory.format import DiffFile, Mapping, diff_name, normalize

__all__ = ["DiffWriter", "Source", "pack"]

Source = tuple[int, memoryview]
"""An open file and a view of its whole content."""


class DiffWriter:
    """Creates ``dest/memfile.<build>`` at the first append; :meth:`finish` gives its length and checksum."""

    def __init__(self, dest: Path, build: UUID) -> None:
        self.build = build
        self.path = Path(dest) / diff_name(build)
        self.length = 0
        self._fd: int | None = None
        self._hasher = xxhash.xxh3_128()
        self._clone = True  # until the filesystem says it cannot share blocks

    def append(self, source: Source, offset: int, length: int) -> int:
        """Append ``length`` bytes of ``source`` from ``offset``; return where they sit in the diff file."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        at = self.length
        fd, view = source
        data = view[offset : offset + length]
        self._clone = self._clone and clone_range(fd, self._fd, offset, at, length)
        if self._clone:
            self._hasher.update(data)
        else:
            write_at(self._fd, data, at, each=self._hasher.update)
        self.length += length
        return at

    def finish(self) -> DiffFile | None:
        """The file's length and checksum, or None when nothing was appended (and no file exists)."""
        if self._fd is None:
            return None
        return DiffFile(self.build, self.length, self._hasher.digest())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DiffWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pack(logical: Iterable[Mapping], sources: dict[UUID, Source], writer: DiffWriter) -> list[Mapping]:
    """Append the bytes of every non-zero mapping of ``logical`` (build -> ``sources``) to ``writer``.

    Returns the same ranges mapped to the writer's build (zero mappings pass through), normalized.
    """
    out: list[Mapping] = []
    for group in _groups(logical):
        first = group[0]
        if first.is_zero:
            out.extend(group)
            continue
        at = writer.append(sources[first.build_id], first.storage_offset, sum(m.length for m in group))
        out.extend(Mapping(m.offset, m.length, writer.build, at + m.offset - first.offset) for m in group)
    return normalize(out)


def _groups(logical: Iterable[Mapping]) -> Iterator[list[Mapping]]:
    """Neighbours contiguous in memory and in one source (or all zero) grouped, to copy them at once."""
    group: list[Mapping] = []
    for m in logical:
        if group:
            last = group[-1]
            if (
                last.build_id == m.build_id
                and last.end == m.offset
                and (m.is_zero or last.storage_offset + last.length == m.storage_offset)
            ):
                group.append(m)
                continue
            yield group
        group = [m]
    if group:
        yield group
