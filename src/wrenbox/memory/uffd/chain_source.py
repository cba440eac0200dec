"""A snapshot chain as the UFFD page server's memory source.

:class:`ChainSource` implements :class:`~wrenbox.memory.uffd.source.PageSource` over a
:class:`~wrenbox.memory.chain.Chain`: each diff file is mapped read-only at a fixed address (so
``UFFDIO_COPY`` copies straight from the page cache), and ``extents`` answers a range by bisecting the
header: zero mappings become zero extents, the others point into their build's mapping. The chain is
checked when opened (lengths, and checksums unless ``verify=False``), so nothing damaged is ever served::

    server = PageServer(socket_path, ChainSource.open(snapshot_dir))
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from uuid import UUID

from wrenbox.errors import InvalidArgument
from wrenbox.memory.chain import Chain
from wrenbox.memory.uffd import abi
from wrenbox.memory.uffd.source import BLOCK_SIZE, Extent

__all__ = ["ChainSource"]


class ChainSource:
    """Serves an open chain; owns it from construction on and closes it with :meth:`close`."""

    def __init__(self, chain: Chain) -> None:
        self._chain = chain
        self._maps: dict[UUID, abi.Mapping] = {}
        try:
            for build in chain.header.builds:
                self._maps[build] = abi.map_file(chain.fileno(build), len(chain.view(build)))
        except BaseException:
            self.close()
            raise
        self._base = {build: m.address for build, m in self._maps.items()}

    @classmethod
    def open(cls, directory: Path, *, verify: bool = True) -> ChainSource:
        return cls(Chain.open(directory, verify=verify))

    @property
    def size(self) -> int:
        return self._chain.size

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        if offset < 0 or length <= 0 or end > self.size or (offset | length) % BLOCK_SIZE:
            raise InvalidArgument(
                f"range [{offset}, {end}) is not a block-aligned part of memory [0, {self.size})"
            )
        out = []
        position = offset
        while position < end:
            loc = self._chain.lookup(position)
            n = min(loc.length, end - position)
            out.append(
                Extent(position, n, None if loc.is_zero else self._base[loc.build_id] + loc.storage_offset)
            )
            position += n
        return out

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mapping in maps.values():
            mapping.close()
        self._chain.close()

    def __enter__(self) -> ChainSource:
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
