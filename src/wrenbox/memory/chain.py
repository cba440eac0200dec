"""An open memory snapshot: its header plus every diff file it references, checked and mapped.

``Chain.open(directory)`` is the one way to read a snapshot directory. It resolves each referenced
build to its diff file (``memfile.<uuid>``, or the seed's legacy ``memfile``), checks every file's length
against the header (and, for version 2 headers, its checksum unless ``verify=False``), and keeps the
files open and mapped read-only until :meth:`Chain.close`. Anything missing, short or damaged raises
:class:`~wrenbox.errors.CorruptData`: a bad snapshot is refused, never served.

What a reader of guest memory uses (the UFFD page server, :meth:`Chain.materialize`)::

    with Chain.open(snapshot_dir) as chain:
        loc = chain.lookup(offset)          # Location(build_id, storage_offset, length), by bisection
        if loc.is_zero: ...                 # zero memory: nothing stored
        else:
            fd = chain.fileno(loc.build_id)     # to mmap it yourself, or copy_file_range from
            data = chain.view(loc.build_id)[loc.storage_offset : loc.storage_offset + n]  # zero-copy
        for m in chain.mappings(start, end): ...    # the mappings clipped to [start, end)

Views and file descriptors belong to the chain: do not use them after ``close()``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from uuid import UUID

from wrenbox.errors import CorruptData, InvalidArgument
from wrenbox.fileio import clone_range, publish, temp_sibling, write_at
from wrenbox.memory.format import HEADER_NAME, DiffFile, Header, Location, Mapping, checksum, diff_name

__all__ = ["LEGACY_DIFF_NAME", "Chain"]

log = logging.getLogger(__name__)

LEGACY_DIFF_NAME = "memfile"
"""The seed's name for a generation-0 diff; read (as a fallback, like the seed), never written."""


class _Open:
    """One diff file held open: fd, read-only shared mapping, and a view of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.length = os.fstat(self.fd).st_size
            self.map = (
                mmap.mmap(self.fd, self.length, mmap.MAP_SHARED, mmap.PROT_READ) if self.length else None
            )
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.map) if self.map is not None else memoryview(b"")

    def close(self) -> None:
        self.view.release()
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                # Slices still referenced (by a caller, an exception's traceback): the mapping goes
                # away with the last of them.
                log.debug("a view of %s outlived its chain", self.path)
        os.close(self.fd)


class Chain:
    """A memory snapshot opened for reading. Use :meth:`open`; close it (or use ``with``)."""

    def __init__(self, directory: Path, header: Header, files: dict[UUID, _Open]) -> None:
        self.directory = directory
        self.header = header
        self._files = files
        self._infos: dict[UUID, DiffFile] = {f.build_id: f for f in header.files}

    @classmethod
    def open(cls, directory: Path, *, verify: bool = True) -> Chain:
        """Open the snapshot in ``directory``; NotFound without a header, CorruptData if anything is off."""
        directory = Path(directory)
        header = Header.read(directory / HEADER_NAME)
        with contextlib.ExitStack() as stack:
            files: dict[UUID, _Open] = {}
            for build in header.builds:
                opened = _Open(_resolve(directory, build))
                stack.callback(opened.close)
                files[build] = opened
            chain = cls(directory, header, files)
            chain._check_lengths()
            if verify:
                chain.verify()
            stack.pop_all()
        return chain

    # -- what the header says ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.header.size

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def generation(self) -> int:
        return self.header.generation

    @property
    def build_id(self) -> UUID:
        return self.header.build_id

    def lookup(self, offset: int) -> Location:
        return self.header.lookup(offset)

    def mappings(self, start: int = 0, end: int | None = None) -> Iterator[Mapping]:
        """The header's mappings clipped to ``[start, end)``, in address order."""
        end = self.size if end is None else end
        if not 0 <= start <= end <= self.size:
            raise InvalidArgument(f"range [{start}, {end}) is outside guest memory [0, {self.size})")
        position = start
        while position < end:
            loc = self.lookup(position)
            length = min(loc.length, end - position)
            yield Mapping(position, length, loc.build_id, loc.storage_offset)
            position += length

    # -- the diff files ---------------------------------------------------------------------------------
    def path(self, build_id: UUID) -> Path:
        return self._file(build_id).path

    def fileno(self, build_id: UUID) -> int:
        return self._file(build_id).fd

    def view(self, build_id: UUID) -> memoryview:
        """A read-only, zero-copy view of a build's whole diff file."""
        return self._file(build_id).view

    def file_info(self, build_id: UUID) -> DiffFile:
        """Length and checksum of a build's diff (computed once for version 1 headers, which lack them)."""
        info = self._infos.get(build_id)
        if info is None:
            opened = self._file(build_id)
            info = self._infos[build_id] = DiffFile(build_id, opened.length, checksum(opened.view))
        return info

    def read(self, offset: int, length: int) -> bytes:
        """Guest memory ``[offset, offset + length)`` as bytes (a convenience; servers use the views)."""
        parts = []
        for m in self.mappings(offset, offset + length):
            if m.is_zero:
                parts.append(bytes(m.length))
            else:
                parts.append(self.view(m.build_id)[m.storage_offset : m.storage_offset + m.length].tobytes())
        return b"".join(parts)

    def verify(self) -> None:
        """Check every diff file against the checksum in the header (version 2; v1 has none to check)."""
        for build, opened in self._files.items():
            recorded = self.header.file(build)
            if recorded is not None and checksum(opened.view) != recorded.checksum:
                raise CorruptData(f"{opened.path}: checksum mismatch, the diff file is damaged")

    def materialize(self, dest: Path) -> None:
        """Write guest memory as one sparse raw file at ``dest`` (which must not exist).

        Data runs are reflinked where the filesystem can, else written; zero runs stay holes.
        The file appears complete or not at all (a crash leaves a temporary that
        :func:`wrenbox.memory.writer.reclaim` removes); it is not fsync'd (it can always be rebuilt).
        """
        dest = Path(dest)
        tmp = temp_sibling(dest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.ftruncate(fd, self.size)
                clone = True  # until the filesystem says it cannot share blocks
                for m in self.header.mappings:
                    if m.is_zero:
                        continue
                    src = self.fileno(m.build_id)
                    clone = clone and clone_range(src, fd, m.storage_offset, m.offset, m.length)
                    if not clone:
                        data = self.view(m.build_id)[m.storage_offset : m.storage_offset + m.length]
                        write_at(fd, data, m.offset)
            finally:
                os.close(fd)
            publish(tmp, dest, durable=False)
        finally:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        files, self._files = self._files, {}
        for opened in files.values():
            opened.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------
    def _file(self, build_id: UUID) -> _Open:
        try:
            return self._files[build_id]
        except KeyError:
            raise InvalidArgument(
                f"build {build_id} is not part of the snapshot in {self.directory}"
            ) from None

    def _check_lengths(self) -> None:
        for build, opened in self._files.items():
            recorded = self.header.file(build)
            if recorded is not None and recorded.length != opened.length:
                raise CorruptData(
                    f"{opened.path}: {opened.length} bytes, the header says {recorded.length} "
                    "(truncated or damaged)"
                )
        for m in self.header.mappings:
            if not m.is_zero and m.storage_offset + m.length > self._files[m.build_id].length:
                raise CorruptData(f"{self._files[m.build_id].path}: too short for the mapping at {m.offset}")


def _resolve(directory: Path, build: UUID) -> Path:
    """The seed's discovery rule: ``memfile.<uuid>``, else the legacy ``memfile``."""
    for name in (diff_name(build), LEGACY_DIFF_NAME):
        path = directory / name
        if path.exists():
            return path
    raise CorruptData(f"{directory}: diff file not found for build {build}")
