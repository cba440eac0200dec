"""Where the page server gets guest memory from: the :class:`PageSource` protocol and a raw-file source.

The page server asks a source about *logical* memory offsets — the offsets of Firecracker's memory file,
which its handshake maps onto guest regions — and copies with ``UFFDIO_COPY`` straight from the address
the source hands back. A source therefore maps its backing data into this process (an ``mmap`` of a file
reads from the page cache with no extra copy) and answers, for a range, which parts are zeros and where
the bytes of the other parts live.

Contract for implementers (the snapshot-chain reader is the next one):

* ``size`` is the length of the logical memory in bytes, a multiple of :data:`BLOCK_SIZE`.
* ``extents(offset, length)`` is only called with ``offset`` and ``length`` multiples of
  :data:`BLOCK_SIZE` and ``offset + length <= size``. It returns :class:`Extent` s that cover exactly
  ``[offset, offset + length)``, in order, without gaps, each starting and ending on a block boundary.
  ``address is None`` means "this range reads as zeros"; otherwise ``length`` readable bytes sit at
  ``address`` in this process and stay there until :meth:`close`. Neighbouring extents may be merged or
  not; fewer is faster. Extents are computed per call, so keep it cheap (a bisection, not a scan): the
  server calls it once per fault.
* A source that finds its data damaged (a checksum that does not match) raises
  :class:`~wrenbox.errors.CorruptData`; the server then stops serving rather than hand out wrong memory.
* ``close()`` releases every mapping and file; it is called once, by the page server that owns the source.
* Calls come from the page server's own thread, one at a time.

Python's :class:`mmap.mmap` does not give out the address of a read-only mapping; map files with
:func:`wrenbox.memory.uffd.abi.map_file` (as :class:`FileSource` does) to have one. A chain of diff files
maps each file once and turns each header mapping clipped to the range into one extent (zero build id →
``None``, else the file's mapping address + storage offset).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from wrenbox.errors import CorruptData, InvalidArgument
from wrenbox.fileio import data_extents
from wrenbox.memory.uffd import abi

__all__ = ["BLOCK_SIZE", "Extent", "FileSource", "PageSource"]

BLOCK_SIZE = 4096


class Extent(NamedTuple):
    offset: int
    length: int
    address: int | None
    """Where the bytes are in this process, or None for zeros."""


@runtime_checkable
class PageSource(Protocol):
    @property
    def size(self) -> int: ...

    def extents(self, offset: int, length: int) -> Sequence[Extent]: ...

    def close(self) -> None: ...


def _data_runs(fd: int, size: int) -> tuple[list[int], list[int]]:
    """Block-aligned [start, end) runs of a file that hold data; everything else is a hole (zeros)."""
    starts: list[int] = []
    ends: list[int] = []
    for data, hole in data_extents(fd, size):
        start = data - data % BLOCK_SIZE
        end = min(-(-hole // BLOCK_SIZE) * BLOCK_SIZE, size)
        if ends and start <= ends[-1]:
            ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


class FileSource:
    """A raw guest-memory file (Firecracker's Full memfile, QEMU's RAM file): holes read as zeros.

    Holes are found once, at open, with SEEK_DATA/SEEK_HOLE, so the server can answer them with
    ``UFFDIO_ZEROPAGE`` and never touch the disk for them. Zero bytes that are written out as data are
    served as data: telling them apart would mean reading the whole file up front.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % BLOCK_SIZE:
                raise CorruptData(
                    f"memory file {self.path} is {size} bytes: not a positive multiple of 4 KiB"
                )
            self._starts, self._ends = _data_runs(fd, size)
            self._map = abi.map_file(fd, size)
        finally:
            # The mapping keeps the file contents reachable; the descriptor is not needed any more.
            os.close(fd)
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def data_bytes(self) -> int:
        """Bytes not in holes (what a server copies; the rest it zero-fills)."""
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        if offset < 0 or length <= 0 or end > self._size or (offset | length) % BLOCK_SIZE:
            raise InvalidArgument(
                f"range [{offset}, {end}) is not a block-aligned part of {self.path} ({self._size} bytes)"
            )
        starts, ends, base = self._starts, self._ends, self._map.address
        out = []
        i = bisect.bisect_right(ends, offset)  # first data run ending after offset
        pos = offset
        while pos < end:
            if i < len(starts) and starts[i] <= pos:
                stop = min(ends[i], end)
                out.append(Extent(pos, stop - pos, base + pos))
                i += 1
            else:
                stop = min(starts[i], end) if i < len(starts) else end
                out.append(Extent(pos, stop - pos, None))
            pos = stop
        return out

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
